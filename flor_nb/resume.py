"""Resume a crashed or interrupted run: the same run (``name@version``) goes on from its last checkpoint.

When a kernel died mid-training, or the user interrupted it, :func:`resume`
rebuilds the cell's objects in the live namespace by re-running the recorded
dependency cells (or keeps the live ones when the kernel survived), re-runs the
recorded training cell with its epoch loop entered at the epoch after the last
intact checkpoint, restoring that checkpoint first, and records into the same
run: logs, digests and checkpoints continue where they stopped. Epochs that
were completed after that checkpoint are trained again; their new rows replace
the stored ones, and a resume that does not reproduce them says so.
"""
from __future__ import annotations

import builtins
import logging
import math
import os
import platform
import sys
import time
import warnings

import torch

from . import checkpoint, housekeeping, runtime, signing, state, validate
from .cells import analyze, strip_shell
from .clock import clock_names
from .errors import FlorError, NoCheckpointError
from .instrument import RUNTIME, instrument, recorded_loops
from .record import bar_factory, execute
from .recorder import Recorder
from .store import RECORDING, Run, get_store

logger = logging.getLogger(__name__)


class Resumer(Recorder):
    """A Recorder that enters the epoch loop at ``first`` with the state of checkpoint ``first - 1``."""

    def __init__(self, store, run: Run, ns, scope, first: int, snap: dict, progress=None, overhead=0.02):
        super().__init__(store, run, ns, scope, progress, overhead)
        self.first, self.snap = first, snap
        self.resume_at = self._enter
        self.replace_below = math.inf  # every epoch run again replaces what a dead session left of it
        self.completed_floor = run.epochs_completed
        self.completed = self._flushed_units = first
        self._last_ckpt = first - 1
        self.checkpointed = sorted(e for e in store.checkpoints(run.id) if e < first)
        self.epoch_seconds = list(run.timings.get("epoch_seconds") or [])[:first]
        self.restore_problems: list = []
        self.differs: list = []  # epochs run again whose values differ from the stored ones
        for r in store.logs([run.id], kind="recorded"):  # number logs after the loop after the stored ones
            if r["epoch"] is None:
                self._seq[(r["name"], r["step"])] = max(self._seq.get((r["name"], r["step"]), 0), r["seq"] + 1)

    def _enter(self, iterable):
        return self.first, self._from_first(iterable)

    def _from_first(self, iterable):
        self.rows.clear()  # what the cell logged before its loop was stored by the first session
        it = iter(iterable)
        restored = False
        try:
            for _ in range(self.first):
                next(it)
            self._restore()
            restored = True
            yield from it
        except StopIteration:  # every epoch was done: the code after the loop sees the final state
            pass
        if not restored:
            self._restore()

    def _restore(self):
        self.restore_problems = self.capturer.restore(self.snap)
        self.snap = None
        if self.progress is not None and not callable(self.progress):
            self.progress.update(self.first)

    def _commit(self, rows, completed=None, digests=(), replace=()):
        for epoch in sorted({r[1] for r in rows if r[1] is not None and r[1] < self.completed_floor}):
            self._compare(epoch, [r for r in rows if r[1] == epoch])
        super()._commit(rows, completed, digests, replace)

    def _compare(self, epoch, rows):
        """An epoch trained again should log what it logged the first time: say so when it does not."""
        new = {(n, s, q): v for n, e, steps, seqs, vals in self._encode(self._number(rows))
               for s, q, v in zip(steps, seqs, vals) if e == epoch}
        old = {(r["name"], r["step"], r["seq"]): r["value"] for r in self.store.logs([self.run.id], kind="recorded")
               if r["epoch"] == epoch}
        differ = sorted({k[0] for k in set(new) | set(old) if not runtime.same(new.get(k), old.get(k))
                         and "__array__" not in str(new.get(k))})
        if differ:
            self.differs.append(epoch)
            warnings.warn(f"flor_nb: resumed {self.run.label}: epoch {epoch}, trained again from the checkpoint "
                          f"after epoch {self.first - 1}, logged different values than the first time "
                          f"({', '.join(differ[:5])}); the new values replace them. Training is not deterministic "
                          "here (see the verdict of a replay of that epoch).", stacklevel=5)


class _Rebuilding:
    """The session while dependency cells run again: flor.arg gives the recorded values, nothing is logged."""

    def __init__(self, args: dict):
        self.args = args

    def log(self, name, value):
        return value

    def arg(self, name, default):
        return validate.arg_live(self.args[name]) if name in self.args else default

    def loop(self, name, iterable):
        return iterable


def resume(run, namespace: dict | None = None, store=None, progress=False, trust_store: bool = False) -> Run:
    """Continue recording ``run`` (``NAME`` or ``NAME@VERSION``) after a crash or an interrupt.

    Parameters
    ----------
    namespace : where to train (the notebook's user namespace). Objects the recorded cell needs that
        are missing are rebuilt by re-running the run's recorded dependency cells; when all are there
        (the kernel survived), the live ones are used. In both cases the last intact checkpoint is restored.
    trust_store : re-sign the store first (see :func:`flor_nb.trust`): only for a store you trust.

    Returns the run, with the resumed epochs; its logs and checkpoints continue the same ``name@version``.
    """
    __tracebackhide__ = True
    st = get_store(store)
    if trust_store:
        housekeeping.trust(st)
    run = st.find_run(run)  # a run left 'running' by a dead process is marked interrupted here
    signing.check_run(run, st.home)
    _check_resumable(run)
    first, snap, skipped = _last_checkpoint(st, run)
    ns = {"__name__": "__main__"} if namespace is None else namespace
    ns[RUNTIME] = sys.modules["flor_nb"]
    ns.setdefault("flor", sys.modules["flor_nb"])
    rebuilt = _rebuild(run, ns)
    tree, _ = instrument(run.code, what="recorded cell", hint=recorded_loops(run.state))
    free, assigned = analyze(run.code)
    spec = run.state.get("spec") or {}
    scope = state.Scope(assigned=assigned, free=free, extra=set(spec.get("extra") or ()),
                        only=set(spec["only"]) if spec.get("only") else None)
    note = {"from_epoch": first, "completed_before": run.epochs_completed, "time": time.time(), "pid": os.getpid(),
            "rebuilt": rebuilt, "damaged_checkpoints": skipped}
    st.update_run(run.id, status="running", ended=None, error=None,
                  env={**run.env, "pid": os.getpid(), "host": platform.node()},
                  state={**run.state, "resumes": [*run.state.get("resumes", []), note]})
    run = st.find_run(run.label)
    logger.warning("flor_nb: resuming %s at epoch %d from the checkpoint after epoch %d (%s)", run.label, first,
                   first - 1, "objects rebuilt from the recorded cells" if rebuilt else "the kernel's live objects")
    bar = bar_factory(progress, run)
    try:
        recorder = Resumer(st, run, ns, scope, first, snap, bar, run.timings.get("overhead_budget") or 0.02)
    except BaseException as e:  # not left 'running': it can be resumed again
        RECORDING.discard((str(st.db_path), run.id))
        st.update_run(run.id, status="interrupted", error=f"resuming failed: {type(e).__name__}: {e}")
        raise
    recorder.capturer.order = list(run.state.get("roots") or [])
    recorder.clock = clock_names(run.code)
    recorder.base_args = run.args
    threads = int(run.env.get("threads") or torch.get_num_threads())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # float reductions depend on it: continue as the run began
    try:
        done = execute(recorder, tree, run.code)
    finally:
        torch.set_num_threads(before)
    if recorder.restore_problems:
        warnings.warn(f"flor_nb: resumed {run.label}: {'; '.join(recorder.restore_problems)}.", stacklevel=2)
    return done


def _check_resumable(run: Run):
    if run.status == "finished":
        raise FlorError(f"{run.label} finished all its epochs; there is nothing to resume. Record it again "
                        "(%%flor record) to train more.")
    if run.status == "running":
        raise FlorError(f"{run.label} is still being recorded by process {run.env.get('pid')} on "
                        f"{run.env.get('host')}. Wait for it to end (or stop it) before resuming.")


def _last_checkpoint(store, run: Run) -> tuple[int, dict, dict]:
    """(first epoch to run, the state to start from, {epoch: why} of damaged checkpoints skipped)."""
    ckpts = store.checkpoints(run.id)
    ends = sorted((e for e, r in ckpts.items() if e < run.epochs_completed and (r["end_path"] or r["kind"] != "step")),
                  reverse=True)
    skipped: dict = {}
    for e in ends:
        rel = ckpts[e]["end_path"] or ckpts[e]["path"]
        try:
            return e + 1, checkpoint.read(store.home, rel), skipped
        except checkpoint.CorruptCheckpointError as err:
            skipped[e] = str(err)
            warnings.warn(f"flor_nb: {err} Resuming from an earlier checkpoint.", stacklevel=3)
    have = ", ".join(map(str, sorted(ckpts))) or "none"
    raise NoCheckpointError(f"{run.label} has no intact checkpoint to resume from (checkpoints taken in epochs: {have}"
                            f"{'; damaged: ' + ', '.join(map(str, skipped)) if skipped else ''}). Record it again.")


def _rebuild(run: Run, ns: dict) -> bool:
    """Re-run the recorded dependency cells in ``ns`` when the objects the cell reads are missing."""
    free, _ = analyze(run.code)
    missing = sorted(n for n in free if n not in ns and not hasattr(builtins, n) and n != "flor")
    if not missing:
        return False
    previous = runtime.activate(_Rebuilding(run.args))
    try:
        for cell in run.deps:
            src = strip_shell(cell["source"])
            try:
                exec(compile(src, f"<cell In[{cell['count']}]>", "exec"), ns)
            except Exception as e:
                raise FlorError(f"Cell In[{cell['count']}] of {run.label} failed while rebuilding the objects to "
                                f"resume with: {type(e).__name__}: {e}. Run the notebook's setup cells yourself, then "
                                f"resume again (the live objects are used).") from e
    finally:
        runtime.deactivate(previous)
    return True
