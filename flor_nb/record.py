"""Record a training cell: run it with logging and a checkpoint at every epoch boundary."""
from __future__ import annotations

import collections
import linecache
import multiprocessing
import logging
import math
import os
import platform
import sys
import time
import traceback
import types
import warnings

import numpy as np
import torch

from . import checkpoint, runtime, state, thinning
from .cells import Cell, analyze, resolve
from .clock import clock_names
from .errors import FlorError, NoLoopError, NotCapturedWarning
from .instrument import RUNTIME, find_helper, helper_code, instrument
from .store import Run, Store
from .thinning import Thinner
from .writer import Writer

logger = logging.getLogger(__name__)
_SERIES_MIN_UNITS = 16  # a name logged once per unit in this many units is stored as one packed row
_FLUSH_SECONDS = 1.0  # logs reach the writer at least this often (a crash loses at most this much)
_MAX_TIMES = 10_000  # unit times kept with a run (a step-only loop runs many more units)
# Digests (what replay checks its state against) get their own small budget, whatever the checkpoint
# budget: hashing is cheap (about 1.5 ms for the bench model), so epochs of 0.15 s and more get one each.
_DIGEST_BUDGET = 0.01


class Recorder:
    """The session while a cell records.

    ``flor.log`` only appends to a list; at each epoch end the rows go to a
    background writer. Checkpoints are snapshots copied in memory on the
    training thread (the only blocking part) and written by the writer. A
    snapshot is taken at the step loop's exit (so replay can skip the step loop
    for probes after it) or, for a cell without one, at the epoch end; how often
    is set by the overhead budget, measured as training goes.
    """

    def __init__(self, store: Store, run: Run, ns: dict, scope: state.Scope, progress=None, overhead=0.02,
                 thinner: Thinner | None = None):
        self.store, self.run, self.ns, self.scope = store, run, ns, scope
        self.capturer = state.Capturer(ns, scope)
        self.overhead = overhead
        self.epoch = None
        self.step = None
        self.rows: list = []
        self.args: dict = {}  # set by the recorded cell
        self.base_args: dict = {}  # set by the cells it depends on (or, in a script, before it)
        self.completed = 0
        self.progress = progress
        self.writer = Writer()
        self.pool = state.BufferPool()
        self.thinner = thinner  # keeps the run's checkpoints under the store budget (see thinning.py)
        self.epoch_seconds: list[float] = []  # of the first units (all of them for epochs)
        self.unit_seconds_total = 0.0
        self.snapshot_seconds: list[float] = []  # blocking time per checkpoint (copy + wait)
        self.digest_seconds: list[float] = []  # blocking time per digest (epochs without a checkpoint)
        self.write_seconds: list[float] = []  # writer-thread time per checkpoint
        self.checkpointed: list[int] = []
        self.not_captured: dict = {}  # path -> reason, announced once when first seen
        self.notes: dict = {}
        self.data: dict = {}
        self.outputs: dict = {}
        self.roots: list = []
        self.objects: dict = {}
        self.checkpoint_error = None
        self.clock = (set(), set())
        self._step_exits = 0
        self._step_snap = None
        self._step_digest = None
        self._left_epoch = None  # (epoch, seconds, step snapshot, end snapshot) when left by break/exception
        self._in_loop = False
        self._done = False
        self._seq: dict = {}
        self._last_ckpt = -1
        self._last_digest = -1
        self._period_ckpt = 1  # units between checkpoints, tuned at each boundary (see _tune)
        self._period_digest = 1  # units between digests where no checkpoint is taken
        self._recent = collections.deque(maxlen=64)  # recent unit times, for tuning
        self._flushed_at = time.perf_counter()
        self._flushed_units = 0
        self._pending_digests: list = []
        self._unit_start = 0.0
        self._latest: dict = {}

    # -- the API (hot path: keep it tiny) ----------------------------------------
    def log(self, name, value):
        t = type(value)
        self.rows.append((name, self.epoch, self.step, value if t is float or t is int else runtime.scalarize(value)))
        return value

    def arg(self, name, default):
        self.args[name] = default
        return default

    def loop(self, name, iterable):
        if name == "epoch" and not self._in_loop:
            return self._epochs(iterable)
        if name == "step" and self.epoch is not None:
            return self._steps(iterable)
        return iterable

    def _steps(self, iterable):
        __tracebackhide__ = True
        try:
            for i, item in enumerate(iterable):
                self.step = i
                yield item
        except GeneratorExit:  # `break` out of the step loop (or an exception): the state right here
            self.step = None
            self._at_step_exit()
            raise
        self.step = None
        self._at_step_exit()

    def _epochs(self, iterable):
        """The outer loop: epochs, or iterations (a while loop, a step-only for), driven through the
        unit API below. Per pass the cost is a few attribute sets; checkpoints, digests and log
        flushes happen at boundaries the overhead budget sets."""
        __tracebackhide__ = True
        self.open_loop(len(iterable) if hasattr(iterable, "__len__") else None)
        for k, item in enumerate(iterable):
            self.begin_unit(k)
            try:
                yield item
            except GeneratorExit:  # break, or an exception in the body: finish() decides
                self.leave_unit(k)
                raise
            self.end_unit(k)
        else:
            self._close_loop()
        self.epoch = None

    # -- the unit API: a loop wrapper, or a framework's callbacks (epoch begin/end), drive it --
    def open_loop(self, total: int | None = None):
        """Before the first unit: the number of units if known, and the state before the loop."""
        self._in_loop = True
        if total is not None:
            self.store.update_run(self.run.id, epochs_total=total)
        if self.progress is not None:
            self.progress = self.progress(total)  # a factory until the epoch count is known
        self._checkpoint(-1, "start", self._snapshot())

    def begin_unit(self, k: int):
        """Unit k (an epoch, an iteration) starts."""
        self.epoch, self.step, self._step_exits, self._step_snap = k, None, 0, None
        self._unit_start = time.perf_counter()

    def end_unit(self, k: int):
        """Unit k ended normally. Boundary work only when due; otherwise O(1)."""
        seconds = time.perf_counter() - self._unit_start
        self._account(k, seconds)
        if self._step_snap is None and k - self._last_ckpt < self._period_ckpt \
                and k - self._last_digest < self._period_digest and seconds < _FLUSH_SECONDS:
            # The common case for iterations: no boundary work at all.
            if time.perf_counter() - self._flushed_at > _FLUSH_SECONDS:
                self._flush(k)
            return
        end = self._snapshot() if self._due(k) else None
        self._end_epoch(k, seconds, self._step_snap, end, None, self._end_digest(end, k))

    def _account(self, k, seconds):
        self.completed = k + 1
        self.unit_seconds_total += seconds
        self._recent.append(seconds)
        if len(self.epoch_seconds) < _MAX_TIMES:
            self.epoch_seconds.append(seconds)

    def leave_unit(self, k: int):
        """Unit k was left by ``break`` (or an exception): :meth:`finish` completes it if the run finished."""
        if self._done:
            return
        end = self._snapshot() if self._due(k) else None
        self._period_digest = 0  # the loop's last unit always gets a check point
        self._left_epoch = (k, time.perf_counter() - self._unit_start, self._step_snap, end, None,
                            self._end_digest(end, k))

    def close_loop(self):
        """After the last unit (the loop ran out)."""
        self._close_loop()
        self.epoch = None

    def _close_loop(self):
        """The loop ended: its last unit always gets a check point, so any replay can be checked up to it."""
        k = self.completed - 1
        if k >= 0 and self._last_ckpt != k and self._last_digest != k:
            self._period_digest = 0
            digest = self._end_digest(None, k)
            if digest is not None:
                self._pending_digests.append((k, "end", digest))
        if k >= 0:
            self._flush(k)

    # -- checkpoints -------------------------------------------------------------
    def _due(self, k) -> bool:
        """Checkpoint unit k? Every unit while affordable; else every ``_period_ckpt`` units (see :meth:`_tune`).

        After the first unit, training never waits for the writer: while it is still writing the
        previous checkpoint, this one is deferred to a later unit (a digest still checks the state here).
        With a big state (1.6 GB at 100M params) a write can outlast an epoch; waiting blocked training
        for seconds per epoch, and a second snapshot in flight doubled the memory the snapshot pool holds.
        The first unit (no unit time known yet) waits for the start checkpoint, so it gets one.
        """
        if self.checkpoint_error or k - self._last_ckpt < self._period_ckpt:
            return False
        if math.isinf(self.overhead):  # every unit, whatever it costs (--overhead inf)
            return True
        return not (self._recent and self.writer.busy())

    def _tune(self):
        """Periods from measured costs: checkpoint every ceil(C / (budget * t)) units, digest every
        ceil(D / (1% * t)), with t the median recent unit time. Called at boundaries only."""
        if not self._recent:
            return
        t = max(sorted(self._recent)[len(self._recent) // 2], 1e-9)
        if self.snapshot_seconds:
            c = sorted(self.snapshot_seconds[-5:])[len(self.snapshot_seconds[-5:]) // 2]
            if t < _FLUSH_SECONDS and self.write_seconds:
                # Short units: the writer's work (hashing, fsync) competes for the same few cores within
                # the period, so it counts too. Long units leave it idle time between checkpoints.
                c += sorted(self.write_seconds[-5:])[len(self.write_seconds[-5:]) // 2]
            # And never sooner than the writer can finish the previous one: with a big state (100M params:
            # 1.6 GB a checkpoint, tens of seconds on a busy disk) the next snapshot would wait for it.
            w = sorted(self.write_seconds[-5:])[len(self.write_seconds[-5:]) // 2] if self.write_seconds else 0.0
            keep_up = 1 if math.isinf(self.overhead) else math.ceil(w / t)  # inf: every unit, whatever it costs
            self._period_ckpt = max(1, math.ceil(c / (self.overhead * t)), keep_up)
        if self.digest_seconds:
            d = sorted(self.digest_seconds[-5:])[len(self.digest_seconds[-5:]) // 2]
            self._period_digest = max(1, min(self._period_ckpt, math.ceil(d / (_DIGEST_BUDGET * t))))

    def _step_exit_ok(self) -> bool:
        return self._step_exits == 1 and self._step_snap is not None

    def step_exit(self):
        """The step loop (inside a unit) ended: a framework that has one calls this at the epoch's last batch."""
        self._at_step_exit()

    def _at_step_exit(self):
        self._step_exits += 1
        self._step_digest = None
        if self._step_exits == 1 and self._due(self.epoch):
            self._step_snap = self._snapshot()
        else:
            self._step_snap = None  # the step loop ran twice: only an epoch-end checkpoint is exact

    def _end_digest(self, end_snap, k):
        """The unit-end digest where no end state is written (with a step checkpoint it is), when one is due."""
        if end_snap is not None or self._step_exit_ok() or k - self._last_digest < self._period_digest:
            return None
        self._last_digest = k
        return self._digest()

    def _digest(self) -> dict:
        """Digests of every stream, without a copy: so a replay can check epochs that got no checkpoint."""
        start = time.perf_counter()
        try:
            digests = self.capturer.digests()
        except Exception as e:  # noqa: BLE001 - verification data must never stop training
            logger.warning("flor_nb: could not digest the state in epoch %s: %s", self.epoch, e)
            return None
        self.digest_seconds.append(time.perf_counter() - start)
        return digests

    def _snapshot(self):
        start = time.perf_counter()
        snap = self.capturer.snapshot(pool=self.pool)
        seconds = time.perf_counter() - start
        self._announce(snap)
        return snap, seconds

    def _announce(self, snap):
        """Say once, when first seen, what cannot be captured: replay could not restore it."""
        new = {p: why for p, why in snap["not_captured"].items() if p not in self.not_captured}
        self.notes.update(snap["notes"])
        self.data.update(snap["data"])
        self.outputs.update(snap["outputs"])
        self.roots = snap["roots"]
        if new:
            self.not_captured.update(new)
            listed = "; ".join(f"{p}: {why}" for p, why in new.items())
            warnings.warn(f"flor_nb: not captured in {self.run.label}: {listed}. Replay rebuilds "
                          f"{'it' if len(new) == 1 else 'these'} from the recorded cells instead of restoring "
                          "the recorded state; a replay that reads them says so in its verdict.",
                          NotCapturedWarning, stacklevel=4)

    def _checkpoint(self, epoch: int, kind: str, taken, end_taken=None):
        if taken is None or self.checkpoint_error:
            return
        snap, copy_seconds = taken
        end_snap, end_seconds = end_taken or (None, 0.0)
        if not self.objects:
            self.objects = self.capturer.kinds
        waited = self.writer.submit_checkpoint(self._persist, epoch, kind, snap, end_snap)
        self.snapshot_seconds.append(copy_seconds + end_seconds + waited)
        self._last_ckpt = self._last_digest = epoch
        self._check_writer()

    def _persist(self, epoch, kind, snap, end_snap):
        """On the writer thread: blobs and files, then the index row."""
        start = time.perf_counter()
        try:
            self._persist_files(epoch, kind, snap, end_snap)
        finally:
            self.write_seconds.append(time.perf_counter() - start)

    def _persist_files(self, epoch, kind, snap, end_snap):
        rel = f"checkpoints/{self.run.name}@{self.run.version}/epoch-{epoch:05d}.{kind}.ckpt"
        info = checkpoint.write(self.store.home, rel, snap)
        end_rel = end = None
        if end_snap is not None:
            end_rel = f"checkpoints/{self.run.name}@{self.run.version}/epoch-{epoch:05d}.end.ckpt"
            end = checkpoint.write(self.store.home, end_rel, end_snap)
        self.store.add_checkpoint(
            self.run.id, epoch, kind, rel, info["bytes"] + (end["bytes"] if end else 0), info["logical_bytes"],
            info["checksum"], runtime.to_json(info["digests"]),
            None if end is None else runtime.to_json(end["digests"]), end_rel)
        self.checkpointed.append(epoch)
        self.pool.release(snap)  # written: its buffers can hold the next snapshot
        self.pool.release(end_snap)
        if self.thinner is not None:
            self.thinner.add(epoch, kind, [(rel, info), (end_rel, end)])

    def _check_writer(self):
        """Surface a failed write once: a full disk stops checkpoints, never training."""
        if self.writer.errors and not self.checkpoint_error:
            e = self.writer.errors[0]
            self.checkpoint_error = f"checkpoints stopped after epoch {max(self.checkpointed, default=-1)}: {e}"
            warnings.warn(f"flor_nb: {self.checkpoint_error}. Completed epochs stay replayable from earlier "
                          "checkpoints; free space, then record again.", stacklevel=3)

    # -- epoch boundary ----------------------------------------------------------
    def _end_epoch(self, k, seconds, step_snap, end_snap, step_digest=None, end_digest=None):
        """Unit k ended at a boundary: checkpoint or digest what is due, then flush the logs."""
        if step_snap is None and step_digest is not None and self._step_exits == 1:
            self._pending_digests.append((k, "step", step_digest))
        if end_digest is not None and not (self._step_exit_ok() and step_snap is not None):
            self._pending_digests.append((k, "end", end_digest))
        if self._step_exit_ok() and step_snap is not None:
            # The epoch-end state too: replay of the next epoch starts from it without re-running
            # this epoch's tail, and checks a probe after the step loop against it. Its tensors
            # barely differ from the step-exit ones, so they are stored once (dedup).
            self._checkpoint(k, "step", step_snap, end_snap or self._snapshot())
        elif end_snap is not None:
            self._checkpoint(k, "end", end_snap)
        self._tune()
        self._flush(k)

    def _flush(self, k):
        """Hand the logs of units up to k (and their digests) to the writer; move the progress bar."""
        rows, self.rows = self.rows, []
        digests, self._pending_digests = self._pending_digests, []
        self.writer.submit(self._write_logs, rows, k + 1, digests)
        self._flushed_at = time.perf_counter()
        units, self._flushed_units = k + 1 - self._flushed_units, k + 1
        self._latest = {n: v for n, e, _, v in rows[-64:] if e == k and isinstance(v, (int, float))}
        if self.progress is not None and not callable(self.progress):
            self.progress.set_postfix({n: f"{v:.4g}" for n, v in self._latest.items()}, refresh=False)
            self.progress.update(units)

    def _write_logs(self, rows, completed=None, digests=()):
        """On the writer thread: number repeated (name, epoch, step) keys, encode, store by group.

        A name logged once per unit with numbers (an iteration loop's loss: thousands of units per flush)
        is packed into one array row, not one group per unit."""
        by_name: dict = {}
        for r in rows:
            by_name.setdefault(r[0], []).append(r)
        per_unit, rest = [], []
        for name, rs in by_name.items():
            epochs = [r[1] for r in rs]
            if (len(rs) >= _SERIES_MIN_UNITS and all(r[2] is None for r in rs) and None not in epochs
                    and len(set(epochs)) == len(epochs) and {type(r[3]) for r in rs} in ({float}, {int})):
                per_unit.append((name, epochs, [r[3] for r in rs]))
            else:
                rest.extend(rs)
        groups: dict = {}
        for name, epoch, step, value in rest:
            g = groups.get((name, epoch))
            if g is None:
                g = groups[(name, epoch)] = ([], [])
            g[0].append(step)
            g[1].append(value)
        out = []
        for (name, epoch), (steps, values) in groups.items():
            if epoch is None or len(set(steps)) != len(steps):
                # Repeats: count them (across flushes too for logs outside the epoch loop).
                seen = self._seq if epoch is None else {}
                seqs = []
                for step in steps:
                    q = seen.get((name, step), 0)
                    seen[(name, step)] = q + 1
                    seqs.append(q)
            else:
                seqs = [0] * len(steps)
            encoded = [
                runtime.encode(v) if type(v) is not np.ndarray
                else save_array(self.store.artifact_dir(self.run.id), self.store.home, name, epoch, s, q, v)
                for s, q, v in zip(steps, seqs, values)
            ]
            encoded = [runtime.to_json(v) if type(v) is dict else v for v in encoded]
            out.append((name, epoch, steps, seqs, encoded))
        self.store.add_log_groups(self.run.id, out, per_unit=per_unit)
        for epoch, where, digest in digests:
            self.store.add_digest(self.run.id, epoch, where, runtime.to_json(digest))
        if completed is not None:
            self.store.update_run(self.run.id, epochs_completed=completed)

    # -- end of the cell ---------------------------------------------------------
    def finish(self, status: str, error: str | None = None):
        self._done = True
        if self._left_epoch is not None and status == "finished":
            k, seconds, step_snap, end_snap, step_digest, end_digest = self._left_epoch  # `break` in epoch k
            self._step_snap = step_snap
            self._account(k, seconds)
            self._end_epoch(k, seconds, step_snap, end_snap, step_digest, end_digest)
        rows, self.rows = self.rows, []
        self.writer.submit(self._write_logs, rows)
        self.writer.close()  # everything submitted is on disk before the run is closed
        self._check_writer()
        args = {**self.base_args, **self.args}
        self.store.update_run(
            self.run.id,
            status=status,
            ended=time.time(),
            epochs_completed=self.completed,
            args=args,
            error=error,
            state={
                **self.run.state,  # the loops chosen at the start
                "capture": 2,  # reachability capture, fingerprinted variables (flor_nb 0.2)
                "objects": self.objects,
                "not_captured": self.not_captured,
                "notes": self.notes,
                "data": self.data,
                "outputs": self.outputs,
                "roots": self.roots,
                "limits": self.capturer.limits,
                "clock_vars": sorted(self.clock[0]),
                "clock_metrics": sorted(self.clock[1]),
                "checkpoint_error": self.checkpoint_error,
                "store_budget": None if self.thinner is None else self.thinner.summary(),
                "spec": {"only": sorted(self.scope.only) if self.scope.only else None, "extra": sorted(self.scope.extra)},
            },
            timings={
                "epoch_seconds": self.epoch_seconds,
                "units": self.completed,
                "unit_seconds_mean": self.unit_seconds_total / self.completed if self.completed else None,
                "snapshot_seconds": self.snapshot_seconds,
                "digest_seconds": self.digest_seconds,
                "write_seconds": self.write_seconds,
                "writer_seconds": self.writer.busy_seconds,
                "writer_cpu_seconds": self.writer.cpu_seconds,
                "overhead_budget": self.overhead,
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
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "start_method": multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_start_method(),
        "host": platform.node(),
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
    overhead: float = 0.02,
    max_store=None,
) -> Run:
    """Run ``code`` (a training cell) in ``namespace``, recording logs and checkpoints.

    Parameters
    ----------
    code : the cell's source; its epoch and step loops are found as README's "How loops are found" says.
    name : run name; recording a name again makes a new version.
    namespace : globals to run in (the notebook's user namespace); a fresh dict if None.
    history : executed cells (the extension tracks them); the ones ``code`` needs are kept, and
        the ``flor.arg`` values they (and ``code``) set are the run's args.
    cells : for scripts, the sources that rebuild the namespace on replay, in order; the run's
        args are those set since the previous record (and by ``code``).
    state_spec : ``"a,b"`` narrows the checkpointed names, ``"+a,+b"`` adds to them.
    overhead : checkpoint time budget as a fraction of training time (every epoch while it fits;
        ``float("inf")``: every epoch, whatever it costs).
    max_store : disk budget for the run's checkpoints, ``"2GB"`` or bytes; over it, older checkpoints are
        thinned (see thinning.py). None: a quarter of the free disk space, at most 20 GB; ``"inf"``: none.
    """
    from . import api

    __tracebackhide__ = True  # IPython shows the user's frames, not ours
    store = api.get_store(store)
    budget = thinning.budget_for(max_store, store.home)  # a bad size fails before anything runs
    ns = {"__name__": "__main__"} if namespace is None else namespace
    tree, loops = instrument(code, namespace=ns)
    since_last = runtime.IDLE.take_args()
    if history is not None:
        deps, missing = resolve(history, code)
        _warn_unrebuildable(missing, ns, name)
        args = {k: v for c in deps for k, v in c.args.items()}  # the run's args: its cells' (later cells win)
    else:
        deps = [Cell(i, src) for i, src in enumerate(cells or [], start=1)]
        args = since_last  # a script has no cells to tell them apart: the args set since the last record
    ns[RUNTIME] = sys.modules["flor_nb"]
    free, assigned = analyze(code)
    only, extra = parse_state(state_spec)
    unknown = sorted(n for n in (only or set()) | extra if n not in ns and n not in assigned)
    if unknown:
        raise FlorError(f"--state names {', '.join(unknown)}, which neither the namespace nor the cell defines. "
                        "Name variables that exist (--state a,b narrows what is saved, --state +a,+b adds).")
    scope = state.Scope(assigned=assigned, free=free, extra=extra, only=only)
    choice = loops.choice()
    helper = find_helper(code, loops, [(c.count, c.source) for c in deps], ns)
    swapped = None
    if helper is not None:  # the step loop is in a function an earlier cell defined (train(dataloader, ...))
        fn = ns[helper["name"]]
        try:
            swapped = (fn, fn.__code__, helper_code(dict((c.count, c.source) for c in deps)[helper["cell"]], helper,
                                                    fn.__code__.co_filename))
            choice["helper"] = helper
        except (SyntaxError, NoLoopError, StopIteration, ValueError) as e:
            logger.info("flor_nb: %s() not instrumented: %s", helper["name"], e)
    run = store.create_run(name, code, deps=[c.to_dict() for c in deps], args=args, env=environment(),
                           state={"loops": choice})
    filename = f"<flor record {run.label}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
    bar = (lambda total: _progress_bar(run, total)) if progress else None
    recorder = Recorder(store, run, ns, scope, bar, overhead, Thinner(store, run, budget, max_store is None))
    recorder.clock = clock_names(code)
    recorder.base_args = args
    previous = runtime.activate(recorder)
    if swapped is not None:
        swapped[0].__code__ = swapped[2]
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
        if swapped is not None:
            swapped[0].__code__ = swapped[1]  # the user's function as it was
    return store.find_run(run.label)


def _warn_unrebuildable(missing, ns, name):
    """Objects the cell needs that no cell replay re-runs creates (made by a %%flor cell, say)."""
    kinds = (torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, types.FunctionType,
             type, torch.utils.data.DataLoader, torch.utils.data.Dataset)
    lost = sorted(n for n in missing if isinstance(ns.get(n), kinds))
    if lost:
        warnings.warn(f"flor_nb: replay of run {name!r} will not be able to rebuild {', '.join(lost)}: no earlier "
                      "cell that replay re-runs creates it (a %%flor cell or code outside the notebook did). "
                      "Create it in a cell of its own, run that cell, and record again.", stacklevel=3)


def _progress_bar(run, total):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=run.label, unit="epoch", leave=True, dynamic_ncols=True)
