"""Record a training cell: run it with logging and a checkpoint at every epoch boundary."""
from __future__ import annotations

import errno
import linecache
import os
import platform
import sys
import time
import traceback
import warnings

import numpy as np
import torch

from . import checkpoint, runtime, state
from .cells import Cell, analyze, dependencies
from .instrument import RUNTIME, instrument
from .store import Run, Store


class Recorder:
    """The session while a cell records: buffers logs, checkpoints at epoch ends."""

    def __init__(self, store: Store, run: Run, ns: dict, scope: state.Scope, progress=None):
        self.store, self.run, self.ns, self.scope = store, run, ns, scope
        self.epoch = None
        self.step = None
        self.rows: list = []
        self.args: dict = {}
        self.completed = 0
        self.epoch_seconds: list[float] = []
        self.checkpoint_seconds: list[float] = []
        self.checkpoint_bytes = 0
        self.checkpoints_kept = 0
        self.checkpoint_error = None
        self.skipped: dict = {}
        self.objects: dict = {}
        self.progress = progress
        self._left_at = None  # (epoch, snapshot) when the loop was left by break/exception
        self._in_loop = False
        self._done = False
        self._art_dir = store.artifact_dir(run.id)
        self._seq: dict = {}

    # -- the API ---------------------------------------------------------------
    def log(self, name, value):
        self.rows.append((name, self.epoch, self.step, runtime.scalarize(value)))
        return value

    def arg(self, name, default):
        self.args[name] = default
        runtime.IDLE.args[name] = default
        return default

    def loop(self, name, iterable):
        if name == "epoch" and not self._in_loop:
            return self._epochs(iterable)
        if name == "step":
            return self._steps(iterable)
        return iterable

    def _steps(self, iterable):
        try:
            for i, item in enumerate(iterable):
                self.step = i
                yield item
        finally:
            self.step = None

    def _epochs(self, iterable):
        self._in_loop = True
        total = len(iterable) if hasattr(iterable, "__len__") else None
        if total is not None:
            self.store.update_run(self.run.id, epochs_total=total)
        if self.progress is not None:
            self.progress = self.progress(total)  # a factory until the epoch count is known
        self.checkpoint(0)
        for k, item in enumerate(iterable):
            self.epoch, self.step = k, None
            start = time.perf_counter()
            try:
                yield item
            except GeneratorExit:  # break, or an exception in the body: decided in finish()
                if not self._done:
                    self._left_at = (k, state.capture(self.ns, self.scope), time.perf_counter() - start)
                raise
            self.end_epoch(k, time.perf_counter() - start)
        self.epoch = None

    # -- epoch boundary --------------------------------------------------------
    def end_epoch(self, k, seconds, snap=None):
        self.epoch_seconds.append(seconds)
        self.flush()
        self.checkpoint(k + 1, snap)
        self.completed = k + 1
        self.store.update_run(self.run.id, epochs_completed=self.completed)
        if self.progress is not None:
            self.progress.set_postfix(self.latest(k), refresh=False)
            self.progress.update(1)

    def latest(self, k) -> dict:
        """The last value of each scalar logged at epoch ``k`` (for the progress bar)."""
        out = {}
        for name, epoch, _, value in self._flushed_tail:
            if epoch == k and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[name] = f"{value:.4g}"
        return out

    def checkpoint(self, boundary: int, snap=None):
        if self.checkpoint_error:
            return
        start = time.perf_counter()
        snap = snap or state.capture(self.ns, self.scope)
        self.skipped.update(snap["skipped"])
        digests = state.digest(snap)
        data = checkpoint.encode(snap, digests)
        rel = f"checkpoints/{self.run.name}@{self.run.version}/epoch-{boundary:05d}.ckpt"
        try:
            checksum = checkpoint.write(self.store.home / rel, data)
        except OSError as e:
            # A full disk must not kill training: keep going, say so, replay uses earlier checkpoints.
            self.checkpoint_error = f"checkpoints stopped at boundary {boundary}: {e}"
            warnings.warn(f"flor_nb: {self.checkpoint_error}. Free space, then record again.", stacklevel=2)
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                warnings.warn(f"flor_nb: unexpected error writing a checkpoint: {e!r}", stacklevel=2)
            return
        self.store.add_checkpoint(self.run.id, boundary, rel, len(data), checksum, runtime.to_json(digests))
        self.checkpoint_bytes += len(data)
        self.checkpoints_kept += 1
        self.checkpoint_seconds.append(time.perf_counter() - start)
        if not self.objects:
            self.objects = {k.partition("/")[2]: k.partition("/")[0] for k in snap["tensors"] if k.startswith("obj/")}

    _flushed_tail: list = []

    def flush(self):
        rows, self.rows = self.rows, []
        self._flushed_tail = rows[-50:]
        encoded = []
        for name, epoch, step, value in rows:
            key = (name, epoch, step)
            seq = self._seq.get(key, 0)
            self._seq[key] = seq + 1
            if isinstance(value, np.ndarray):
                value = save_array(self._art_dir, self.store.home, name, epoch, step, seq, value)
            encoded.append((name, epoch, step, seq, runtime.to_json(value)))
        self.store.add_logs(self.run.id, encoded)

    # -- end of the cell -------------------------------------------------------
    def finish(self, status: str, error: str | None = None):
        self._done = True
        if self._left_at is not None and status == "finished":
            k, snap, seconds = self._left_at  # the loop ended with `break` in epoch k
            self.end_epoch(k, seconds, snap)
        self.flush()
        args = {**runtime.IDLE.args, **self.args}
        self.store.update_run(
            self.run.id,
            status=status,
            ended=time.time(),
            epochs_completed=self.completed,
            args=args,
            error=error,
            state={
                "objects": self.objects,
                "skipped": self.skipped,
                "checkpoint_error": self.checkpoint_error,
                "spec": {"only": sorted(self.scope.only) if self.scope.only else None, "extra": sorted(self.scope.extra)},
            },
            timings={
                "epoch_seconds": self.epoch_seconds,
                "checkpoint_seconds": self.checkpoint_seconds,
                "checkpoint_bytes": self.checkpoint_bytes,
            },
        )
        if self.progress is not None and not callable(self.progress):
            self.progress.close()


def save_array(art_dir, home, name, epoch, step, seq, value) -> dict:
    art_dir.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    path = art_dir / f"{safe}-e{epoch}-s{step}-{seq}.npy"
    np.save(path, value)
    return {"__array__": str(path.relative_to(home)), "shape": list(value.shape), "dtype": str(value.dtype)}


def environment() -> dict:
    """What the run ran on: enough to explain a replay that does not reproduce."""
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
    for mod in ("pandas", "sklearn", "flor_nb"):
        m = sys.modules.get(mod)
        if m is not None:
            env[mod] = getattr(m, "__version__", "?")
    return env


def parse_state(spec: str | None) -> tuple[set | None, set]:
    """``--state a,b`` narrows to those names; ``--state +a,+b`` adds them to what is found."""
    if not spec:
        return None, set()
    names = [s.strip() for s in spec.split(",") if s.strip()]
    extra = {n[1:] for n in names if n.startswith("+")}
    only = {n for n in names if not n.startswith("+")}
    return (only or None), extra


def record(
    code: str,
    name: str = "run",
    namespace: dict | None = None,
    history: list[Cell] | None = None,
    cells: list[str] | None = None,
    state_spec: str | None = None,
    store: Store | str | None = None,
    progress: bool = False,
) -> Run:
    """Run ``code`` (a training cell) in ``namespace``, recording logs and checkpoints.

    Parameters
    ----------
    code : the cell's source; its first top-level ``for`` is the epoch loop.
    name : run name; recording a name again makes a new version.
    namespace : globals to run in (the notebook's user namespace); a fresh dict if None.
    history : executed cells (the extension tracks them); the ones ``code`` needs are kept.
    cells : for scripts, the sources that rebuild the namespace on replay, in order.
    state_spec : ``"a,b"`` narrows the checkpointed names, ``"+a,+b"`` adds to them.
    """
    from . import api

    store = api.get_store(store)
    tree, _ = instrument(code)
    if history is not None:
        deps = dependencies(history, code)
    else:
        deps = [Cell(i, src) for i, src in enumerate(cells or [], start=1)]
    ns = {"__name__": "__main__"} if namespace is None else namespace
    ns[RUNTIME] = sys.modules["flor_nb"]
    free, assigned = analyze(code)
    only, extra = parse_state(state_spec)
    scope = state.Scope(assigned=assigned, free=free, extra=extra, only=only)
    run = store.create_run(name, code, deps=[c.to_dict() for c in deps], args=dict(runtime.IDLE.args), env=environment())
    filename = f"<flor record {run.label}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
    bar = (lambda total: _progress_bar(run, total)) if progress else None
    recorder = Recorder(store, run, ns, scope, bar)
    previous = runtime.activate(recorder)
    try:
        exec(compile(tree, filename, "exec"), ns)
    except BaseException as e:
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        recorder.finish(status, "".join(traceback.format_exception_only(type(e), e)).strip())
        raise
    else:
        recorder.finish("finished")
    finally:
        runtime.deactivate(previous)
    return store.find_run(run.label)


def _progress_bar(run, total):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=run.label, unit="epoch", leave=True, dynamic_ncols=True)
