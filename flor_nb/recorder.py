"""The recorder: what runs while a cell records (logs, checkpoints, digests at unit boundaries)."""
from __future__ import annotations

import collections
import logging
import math
import threading
import time
import warnings

from . import cpu_math, disk, machine, omission, runtime, saver, state, validate
from .checkpointing import Checkpointing
from .omission import Omission
from .errors import DiskFullError, NotCapturedWarning, StoreError
from .plan import own_range
from .rows import RowCommits
from .run_close import RunClose
from .store import RECORDING, Run, Store
from .writer import Writer

logger = logging.getLogger(__name__)
_FLUSH_SECONDS = 1.0  # short units' logs are stored at least this often (a kill loses at most this much)
# A unit at least this long (an epoch) is stored as soon as it ends: a commit costs well under 1 ms.
_COMMIT_UNIT_SECONDS = 0.1
_MAX_TIMES = 10_000  # unit times kept with a run (a step-only loop runs many more units)
# Digests (what replay checks its state against) get their own small budget, whatever the checkpoint
# budget: hashing is cheap (about 1.5 ms for the bench model), so epochs of 0.15 s and more get one each.
_DIGEST_BUDGET = 0.01
# Iterations (units under _COMMIT_UNIT_SECONDS) share one budget instead: the overhead budget covers all the
# boundary work, each boundary's commit included, with a part left for the per-iteration path (about
# 2 us, 0.6% of a 300 us makemore step). With 2% for checkpoints plus 1% for digests on top, a step-only
# loop measured +3.5..+4.3% against plain (engine accounting: checkpoints 2.1%, digests 1%, commits 0.6%).
# Shares of 60% and 25% still measured +4.3% (s.e. 0.8%, 16 reps, bench/iterations.py): what a boundary costs
# beside training (the saver's CPU on the other core of this 2-core VM) is about twice what the accounting counts,
# and the cell's fixed cost (about 60 ms) comes on top. Half those shares measured +1.3% (s.e. 0.9%).
_ITER_SHARES = (0.3, 0.125)  # of the overhead budget: checkpoints, digests (the rest: the per-unit path)


def _recent_median(seconds: list) -> float:
    """The median of the last 5 measurements: one slow outlier does not move a period."""
    last = sorted(seconds[-5:])
    return last[len(last) // 2]


class Recorder(RowCommits, Checkpointing, Omission, RunClose):
    """The session while a cell records.

    ``flor.log`` only appends to a list; at each unit boundary the rows are
    committed (see rows.py). Checkpoints are snapshots copied in memory on the
    training thread (the only blocking part) and written by the writer thread. A
    snapshot is taken at the step loop's exit (so replay can skip the step loop
    for probes after it) or, for a cell without one, at the epoch end; how often
    is set by the overhead budget, measured as training goes.
    """

    def __init__(self, store: Store, run: Run, ns: dict, scope: state.Scope, progress=None, overhead=0.02,
                 thinner=None):
        self.store, self.run, self.ns, self.scope = store, run, ns, scope
        RECORDING.add((str(store.db_path), run.id))
        cpu_math.settle()  # the recording's first vector math call is exact, as a replay's is (see cpu_math)
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
        self.saver = None  # the process that writes checkpoints, where it can (saver.py)
        self.saver_writes, self.saver_cpu = 0, 0.0  # checkpoints of this run it wrote, and its CPU seconds
        if saver.mode() == "process":
            self.saver = saver.current()
            self.pool.shared = self.saver.buffers
        self.thinner = thinner  # keeps the run's checkpoints under the store budget (see thinning.py)
        self.epoch_seconds: list[float] = []  # of the first units (all of them for epochs)
        self.unit_seconds_total = 0.0
        self.snapshot_seconds: list[float] = []  # blocking time per checkpoint (copy + wait)
        self.digest_seconds: list[float] = []  # blocking time per digest (epochs without a checkpoint)
        self.digest_errors: list = []  # [unit, error] of digests that failed (the first few)
        self.write_seconds: list[float] = []  # writer-thread time per checkpoint
        self.write_cpu_seconds: list[float] = []  # of it, CPU (the rest waits for the disk)
        self.checkpointed: list[int] = []
        self.not_captured: dict = {}  # path -> reason, announced once when first seen
        self.data_watch = None  # data_watch.Watch: DataLoaders/Datasets training changes (set by record.py)
        self.quiet_roots: set = set()  # roots listed when not captured, but not warned about (record.py)
        self.notes: dict = {}
        self.data: dict = {}
        self.outputs: dict = {}
        self.roots: list = []
        self.objects: dict = {}
        self.checkpoint_error = None
        self.clock = (set(), set())
        self._step_exits = 0
        self._step_snap = None
        self._left_epoch = None  # (epoch, seconds, step snapshot, end snapshot, end digest): left by break/exception
        self._in_loop = False
        self.loop_range = None  # [start, step] of a range(1, n + 1)-like epoch loop: replays name its values
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
        self._held: list = []  # (rows numbered, per-unit rows, completed, digests, replace) not yet stored (full disk)
        self._stored_count = 0  # units whose rows are in the store
        self.held_error = None  # why they are held
        self.commit_seconds: list[float] = []  # storing each epoch's rows, on the training thread
        self.replace_below = 0  # a resumed run re-runs epochs below this: their rows replace the stored ones
        self.resume_at = None  # resume.py: iterable -> (first epoch, iterable from it), restoring the state
        self.completed_floor = 0  # epochs stored before this session (a resumed run keeps them)
        self.start_wait = 0.0  # seconds the training thread waited for the first checkpoint's write
        self.close_wait = 0.0  # seconds finish() waited for the writer (the last checkpoints' writes)
        self.liveness_input = None  # (code, loops choice, dependency sources): see _dead()
        self._dead = None  # liveness.Dead, judged once the first unit has bound the body's names
        self._total = None  # units the loop will run, when known
        self._busy = None  # see _cores_busy
        self._gpu_state = False  # a snapshot held CUDA tensors (see _cores_busy)
        self.omitting: list[int] = []  # units whose checkpoint left out values the next unit recomputes
        self.omitting_steps: list[int] = []  # epochs whose step-exit state left values out (Dead.steps)
        self.uncarried: list[int] = []  # epochs whose step-exit state lacks the helper's variables (Omission.carry)
        self._whole = (None, 0)  # (epoch whose checkpoints keep everything, how many such kept so far): _dead_at
        self.whole_every = omission._WHOLE_EVERY[0]  # set from the sizes of the first checkpoint that leaves values out
        self._start_pending = False  # the start checkpoint is still being written: no unit counts as stored
        self._start_written = threading.Event()  # set by the writer once the start checkpoint is on disk

    # -- the API (hot path: keep it tiny) ----------------------------------------
    def log(self, name, value):
        t = type(value)
        if (t is float or t is int) and type(name) is str and name:
            self.rows.append((name, self.epoch, self.step, value))
        else:
            self.rows.append((name, self.epoch, self.step, self._keep(name, value)))
        return value

    def _keep(self, name, value):
        """flor.log's slow path: check the name and value now, so a bad one stops the cell at its line."""
        validate.log_name(name)
        return validate.log_value(name, runtime.scalarize(value))

    def arg(self, name, default):
        self.args[name] = validate.arg_value(name, default)
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
        self.loop_range = own_range(iterable)
        first = 0
        if self.resume_at is not None:  # a resumed run: skip the stored epochs, restore, go on (resume.py)
            first, iterable = self.resume_at(iterable)
        for k, item in enumerate(iterable, start=first):
            self.begin_unit(k)
            try:
                yield item
            except GeneratorExit:  # break, or an exception in the body: finish() decides
                self.leave_unit(k)
                self.epoch = self.step = None  # what the lines after the loop log has no unit, as after its end
                raise
            self.end_unit(k)
        else:
            self._close_loop()
        self.epoch = None

    # -- the unit API: a loop wrapper, or a framework's callbacks (epoch begin/end), drive it --
    def open_loop(self, total: int | None = None):
        """Before the first unit: the number of units if known, and the state before the loop."""
        self._in_loop = True
        self._total = total
        if total is not None:
            try:
                self.store.update_run(self.run.id, epochs_total=total)
            except StoreError as e:  # informative only: never a reason to stop training
                logger.warning("flor_nb: could not store the epoch count of %s: %s", self.run.label, e)
        if self.progress is not None:
            self.progress = self.progress(total)  # a factory until the epoch count is known
        if self.resume_at is None:
            submitted = len(self.snapshot_seconds)
            self._checkpoint(-1, "start", self._snapshot())
            # Every unit replays from this state. Training does not wait for its write (10-15 ms with the
            # fsyncs) before the first unit; the first commit of a unit count waits for it (rows.py), so
            # no unit is ever stored without a checkpoint below it.
            self._start_pending = len(self.snapshot_seconds) > submitted

    def begin_unit(self, k: int):
        """Unit k (an epoch, an iteration) starts."""
        self.epoch, self.step, self._step_exits, self._step_snap = k, None, 0, None
        self._unit_start = time.perf_counter()

    def end_unit(self, k: int):
        """Unit k ended normally. Boundary work only when due; otherwise O(1)."""
        seconds = time.perf_counter() - self._unit_start
        self._account(k, seconds)
        if self._step_snap is None and seconds < _COMMIT_UNIT_SECONDS and (
                k - self._last_ckpt < self._period_ckpt and k - self._last_digest < self._period_digest
                or self._start_pending and not self._start_written.is_set() and not math.isinf(self.overhead)):
            # The common case for iterations: no boundary work at all. Nor while the start checkpoint is still
            # being written: a boundary's commit would wait for it (10-15 ms); a later iteration takes it (but
            # for --overhead inf, every unit).
            if time.perf_counter() - self._flushed_at > _FLUSH_SECONDS:
                self._flush(k)
            return
        self._end_epoch(k, seconds)

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
        self._left_epoch = (k, time.perf_counter() - self._unit_start, self._step_snap, end,
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

    # -- at unit boundaries: periods, step exits, digests (checkpoints: checkpointing.py) --
    @property
    def _cores_busy(self) -> bool:
        """Recording's own CPU (the writer thread, the saver process) is taken from training: fewer than two
        cores are left free of torch's threads, and the state is not on a GPU.

        One free core is not enough: on this project's 2-core VMs a load of 10% of one core beside a
        one-thread training loop slowed it by 8-13% (``bench/core_coupling.py``), and a recording at one
        thread was 3.7% slower than plain where the blocking copies alone were 0.75%. A GPU's training runs
        its kernels there (torch's CPU threads idle, 16 of 16 on an H100 machine, where counting the writer's
        CPU against training spaced checkpoints ~10 epochs apart)."""
        if self._busy is None:
            import torch

            self._busy = machine.usable_cpus() - torch.get_num_threads() < 2
        return self._busy and not self._gpu_state

    def _tune(self):
        """Periods from measured costs: checkpoint every ceil(C / (budget * t)) units, digest every
        ceil(D / (1% * t)), with t the median recent unit time. Units shorter than
        ``_COMMIT_UNIT_SECONDS`` (iterations) share the budget instead (``_ITER_SHARES``), and each
        boundary's commit counts in C and D. Called at boundaries only."""
        if not self._recent:
            return
        t = max(sorted(self._recent)[len(self._recent) // 2], 1e-9)
        if t < _COMMIT_UNIT_SECONDS:
            budget_ckpt, budget_digest = (share * self.overhead for share in _ITER_SHARES)
            commit = _recent_median(self.commit_seconds) if self.commit_seconds else 0.0
        else:
            budget_ckpt, budget_digest, commit = self.overhead, _DIGEST_BUDGET, 0.0
        if self.snapshot_seconds:
            c = _recent_median(self.snapshot_seconds) + commit
            if self.write_cpu_seconds and (t < _COMMIT_UNIT_SECONDS or self._cores_busy):
                # The writer's and the saver's CPU work (hashing, copying, system calls; not waits for the
                # disk) is taken from training when cores are short (see _cores_busy), or within the period
                # of many tiny units. With two or more cores free, units of 0.1 s and more do not pay it.
                c += _recent_median(self.write_cpu_seconds)
            # And never sooner than the writer can finish the previous one: with a big state (100M params:
            # 1.6 GB a checkpoint, tens of seconds on a busy disk) the next snapshot would wait for it.
            w = _recent_median(self.write_seconds) if self.write_seconds else 0.0
            keep_up = 1 if math.isinf(self.overhead) else math.ceil(w / t)  # inf: every unit, whatever it costs
            self._period_ckpt = max(1, math.ceil(c / (budget_ckpt * t)), keep_up)
        if self.digest_seconds:
            d = _recent_median(self.digest_seconds) + commit
            self._period_digest = max(1, min(self._period_ckpt, math.ceil(d / (budget_digest * t))))

    def _step_exit_ok(self) -> bool:
        return self._step_exits == 1 and self._step_snap is not None

    def step_exit(self):
        """The step loop (inside a unit) ended: a framework that has one calls this at the epoch's last batch."""
        self._at_step_exit()

    def _at_step_exit(self):
        self._step_exits += 1
        if self._step_exits == 1 and self._due(self.epoch):
            self._step_snap = self._snapshot(self._dead_at(self.epoch, step_exit=True))
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
        for attempt in range(2):  # a second try: a transient error (another thread resized a dict) passes
            try:
                digests = self.capturer.digests()
                break
            except Exception as e:  # noqa: BLE001 - verification data must never stop training
                error = f"{type(e).__name__}: {e}"
        else:
            # Said at once and kept with the run: a replay of these units says why their state is unchecked.
            if not self.digest_errors:
                warnings.warn(f"flor_nb: {self.run.label}: the training state could not be digested in unit "
                              f"{self.epoch} ({error}); replays of units without a checkpoint after it cannot "
                              "check their state and will say so.", NotCapturedWarning, stacklevel=5)
            if len(self.digest_errors) < 5:
                self.digest_errors.append([self.epoch, error])
            return None
        self.digest_seconds.append(time.perf_counter() - start)
        return digests

    # -- epoch boundary ----------------------------------------------------------
    def _end_epoch(self, k, seconds, left=None):
        """Unit k ended at a boundary: store its rows and completion first (a kill, or an OOM in the
        snapshot copy, from here on cannot lose unit k), then checkpoint or digest what is due.

        ``left``: (step snapshot, end snapshot, end digest) taken when a ``break`` left it.
        """
        self._flush(k)
        self._watch_data(k)
        if left is None:
            step_snap = self._step_snap
            dead = self._dead_at(k)
            end_snap = self._snapshot(dead) if self._due(k) else None
            end_digest = self._end_digest(end_snap, k)
        else:
            step_snap, end_snap, end_digest = left
            dead = None
        step_ok = self._step_exit_ok() and step_snap is not None
        if step_ok and end_snap is None:
            # The epoch-end state too: replay of the next epoch starts from it without re-running
            # this epoch's tail, and checks a probe after the step loop against it. Its tensors
            # barely differ from the step-exit ones, so they are stored once (dedup).
            end_snap = self._snapshot(dead)
        self._note_omitted(k, end_snap, step_snap if step_ok else None)
        if end_digest is not None and not step_ok:
            self._pending_digests.append((k, "end", end_digest))
        self._store_digests()
        if step_ok:
            self._checkpoint(k, "step", step_snap, end_snap)
        elif end_snap is not None:
            self._checkpoint(k, "end", end_snap)
        self._check_writer()
        self._tune()

    def _watch_data(self, k):
        """Name, when it happens, a DataLoader or Dataset training changed: a replay would read it unchanged."""
        if self.data_watch is None:
            return
        unit = ((self.run.state or {}).get("loops") or {}).get("unit")
        self._tell_not_captured(self.data_watch.changed(k, "iteration" if unit == "iterations" else "epoch"))

    def _flush(self, k):
        """Store the logs of units up to k, their digests and the count of completed units, now, in one
        transaction; move the progress bar."""
        rows, self.rows = self.rows, []
        digests, self._pending_digests = self._pending_digests, []
        replace = tuple(range(self._flushed_units, min(k + 1, self.replace_below)))
        self._commit(rows, k + 1, [(e, w, runtime.to_json(d)) for e, w, d in digests], replace)
        self._flushed_at = time.perf_counter()
        units, self._flushed_units = k + 1 - self._flushed_units, k + 1
        latest = {n: v for n, e, _, v in rows[-64:] if e == k and isinstance(v, (int, float))}
        self._latest = latest or self._latest  # a flush with no new values (the cell's end) keeps the last shown
        if self.progress is not None and not callable(self.progress):
            self.progress.set_postfix({n: f"{v:.4g}" for n, v in self._latest.items()}, refresh=False)
            self.progress.update(units)

    # -- end of the cell ---------------------------------------------------------
    def finish(self, status: str, error: str | None = None):
        self._done = True
        if self._left_epoch is not None and status == "finished":
            k, seconds, step_snap, end_snap, end_digest = self._left_epoch  # `break` in epoch k
            self._step_snap = step_snap
            self._account(k, seconds)
            self._end_epoch(k, seconds, (step_snap, end_snap, end_digest))
        rows, self.rows = self.rows, []
        # What was logged after the loop (or in a unit an exception left), and units not flushed yet.
        digests, self._pending_digests = self._pending_digests, []
        self._commit(rows, self.completed or None, [(e, w, runtime.to_json(d)) for e, w, d in digests],
                     tuple(range(self._flushed_units, min(self.completed, self.replace_below))))
        closing = time.perf_counter()
        self.writer.close()  # every checkpoint submitted is on disk before the run is closed
        self.close_wait = time.perf_counter() - closing
        if self.saver is not None:  # the saver stays for the next recording, and so do the buffers it can keep
            self.saver.forget(self.pool.close())
        self._check_writer()
        stored = self._stored_units()
        held = max(self.completed - stored, 0)
        lost = None
        if self._held:
            full = disk.is_full(self.held_error)
            why = disk.full_message(self.store.home, "the log rows could not be written") if full else \
                f"storing log rows failed ({type(self.held_error).__name__}: {str(self.held_error).rstrip('.')})"
            fix = "Free space on that disk and record again." if full else \
                "Fix what the error names (the store's folder or disk), then record again."
            lost = (f"{self.run.label}: {why}. " + (f"Epochs 0-{stored - 1} are stored and replayable; " if stored
                    else "No epoch is stored; ") + f"the logs of {held or 'the last'} trained epoch(s) after them are "
                    f"lost. {fix}")
            status, error = "failed", lost
        args = {**self.base_args, **self.args}
        try:
            self._close_run(status, error, stored, args)
        except StoreError:
            if not lost:
                raise
            lost += " (The run's final status could not be stored either: it shows as interrupted.)"
        finally:
            RECORDING.discard((str(self.store.db_path), self.run.id))
            if self.progress is not None and not callable(self.progress):
                self.progress.close()
        if lost:
            raise (DiskFullError if disk.is_full(self.held_error) else StoreError)(f"flor_nb: {lost}")
