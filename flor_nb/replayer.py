"""The session inside a replay worker: restore a segment's checkpoints, run its units, check their state."""
from __future__ import annotations

import logging
import pickle
import time

from . import checkpoint, devices, probe_state, runtime, validate
from .errors import ReplayError
from .paths import root
from .plan import FULL, SKIP
from .replay_events import emit

logger = logging.getLogger(__name__)


class _ReplayDone(BaseException):
    """Raised out of the epoch loop after the segment's last epoch: skips the cell's tail."""


class Replayer:
    """The session inside a worker: logs of kept epochs go to a list; args return recorded values."""

    def __init__(self, task: dict):
        self.task = task
        self.home = task["home"]
        self.blobs = task.get("blobs") or self.home  # checkpoints: the store's folder, a shared one, or a URL
        seg = task["segment"]
        self.first, self.last, self.restore_at = seg["first"], seg["last"], seg["restore"]
        self.modes = {int(k): v for k, v in seg["modes"].items()}
        self.keep = set(seg["keep"])
        self.tail = bool(task.get("tail"))  # after the last unit, run the cell's lines after its loop
        self.in_tail = False
        self.after_loop = False  # left by `break`: the lines after it are not the unit's
        self.in_head = bool(task.get("head"))  # until the loop starts, keep what the lines before it log
        self.head_differs: list = []
        self.head_ran = self.head_checked = False
        self.args = task["args"]
        self.epoch = None
        self.step = None
        self.mode = None
        self.rows: list = []
        self.seq: dict = {}
        self.setup = True
        self.ns: dict = {}
        self.scope = None
        self.capturer = None
        self.setup_output = ""
        self.divergence: list = []  # {epoch, where, differ, missing}
        self.checks: list = []  # {epoch, where, streams}: what was compared
        self.problems: list = []
        self.exclude = set(task.get("exclude") or ())
        self.unreplayed: set = set()  # keys the restored step-exit state left out: not compared at this epoch's end
        self.left_out_names = task.get("left_out_names") or ()
        self._carried = None  # the helper's variables kept with the restored step-exit state (pickled)
        self.epoch_seconds: dict = {}
        self.restore_seconds = 0.0
        self._in_loop = False
        self._unit_start = 0.0
        self.last_step = None  # survives the step loop's cleanup, for error messages
        gpu = task.get("gpu") or {}
        self.devices = {"device_map": task.get("device"), "recorded": [], "flags": gpu.get("flags"),
                        "recorded_cuda_available": gpu.get("cuda_available"), "lost_rng": [],
                        "flag_problems": [], "mapped": [], "misplaced": [],
                        "recorded_gpus": gpu.get("devices") or [], "gpus_here": None, "restored": False}
        # CUDA generators recorded but with no CUDA here: lost only if the recording drew from them
        self._cuda_rng_unplaced: str | None = None  # their digest as restored
        self._cuda_rng_pending: set = set()  # cuda:i, until a check tells whether they were drawn from
        self._cuda_rng_checked = False  # a check since the last restore found them unchanged

    def log(self, name, value):
        outside = self.in_tail or self.in_head  # the lines before or after the loop: no epoch
        if (outside or (self.epoch in self.keep and not self.after_loop)) and not self.setup:
            epoch = None if outside else self.epoch
            key = (name, epoch, self.step)
            seq = self.seq.get(key, 0)
            self.seq[key] = seq + 1
            validate.log_name(name)
            self.rows.append((name, epoch, self.step, seq, validate.log_value(name, runtime.scalarize(value))))
        return value

    def arg(self, name, default):
        return validate.arg_live(self.args[name]) if name in self.args else default

    def carry(self, names, local: dict) -> dict:
        """The helper's variables after its step loop: as it left them, or where the loop was skipped, as the
        recording kept them with that state (see ``Omission.carry``)."""
        if self.mode != SKIP or self.setup:
            return runtime.bound_names(names, local)
        if self._carried is None:
            raise ReplayError(f"The recording did not keep {', '.join(names)} of the helper at epoch {self.epoch}, "
                              "whose code after its step loop reads them; replay this epoch with its step loop "
                              "(an edited helper runs it).")
        return pickle.loads(self._carried)  # signed by this user: checkpoint.read verified it

    def loop(self, name, iterable):
        if self.setup:
            return iterable
        if name == "epoch" and not self._in_loop:
            return self._epochs(iterable)
        if name == "step" and self.epoch is not None:
            return self._skipped() if self.mode == SKIP else self._steps(iterable)
        return iterable

    def _restore(self, paths: str, epoch: int, snap: dict | None = None):
        t = time.perf_counter()
        try:
            snap = checkpoint.read(self.blobs, self.task[paths][str(epoch)]) if snap is None else snap
        except checkpoint.CorruptCheckpointError as e:  # say which epoch: replay routes around it
            raise checkpoint.CorruptCheckpointError(str(e), e.path, epoch) from None
        devices.check_available(self.capturer.device_map, _recorded_devices(snap))
        problems = self.capturer.restore(snap)
        self.problems.extend(f"{p} when restoring epoch {epoch}" for p in problems)
        self._note_devices(snap)
        self.restore_seconds += time.perf_counter() - t
        return snap

    def _note_devices(self, snap: dict):
        """What the verdict needs to judge devices: where the state was recorded, with which settings."""
        cap, info = self.capturer, self.devices
        info["recorded"] = sorted(set(info["recorded"]) | _recorded_devices(snap))
        if info["gpus_here"] is None:  # after the cells: asking for names starts CUDA, which they may configure
            info["gpus_here"] = devices.environment()["devices"]
        if "devflags" in snap["python"]:
            info["flags"] = snap["python"]["devflags"]
        info["restored"] = True
        cuda_gens = cap.unplaced_cuda_rng
        self._cuda_rng_pending |= cuda_gens
        self._cuda_rng_unplaced = (checkpoint.tensor_digests({"rng/cuda": snap["tensors"]["rng/cuda"]})["rng/cuda"]
                                   if cuda_gens and "rng/cuda" in snap["tensors"] else None)
        self._cuda_rng_checked = False
        info["lost_rng"] = sorted(set(info["lost_rng"]) | cap.lost_rng)
        info["flag_problems"] = sorted(set(info["flag_problems"]) | set(cap.flag_problems))
        roots = [r for r in cap.order if r in self.ns]
        info["mapped"] = sorted(set(info["mapped"]) | set(devices.map_device_values(self.ns, roots, cap.device_map,
                                                                                    info["recorded"])))
        info["misplaced"] = sorted(set(info["misplaced"]) | set(devices.misplaced(self.ns, roots, cap.device_map)))

    def _skipped(self):
        """The step loop, memoized: put back the state it left, run none of it. What that state left out (the
        gradients, the last batch: the next epoch recomputes them first) is not compared at this epoch's end:
        nothing ran that computes it."""
        snap = self._restore("step_paths", self.epoch)
        self._carried = snap["python"].get("carry")
        omitted = set(snap["python"].get("omitted", ()))
        if omitted:  # the variables the run left out, and so the containers that held their tensors (``data``)
            omitted |= {f"{kind}/{n}" for n in self.left_out_names for kind in ("var", "vmeta", "val", "valgrad")}
        self.unreplayed = omitted
        return
        yield  # a generator that yields nothing

    def _steps(self, iterable):
        try:
            for i, item in enumerate(iterable):
                self.step = self.last_step = i
                yield item
            self.last_step = None  # the loop ended normally: later errors are not "in a step"
        finally:
            self.step = None
        self._verify(self.epoch, self.task["step_digests"], "step")

    def _end_head(self):
        """The loop starts: the lines before it ran on the state the start checkpoint holds, or say what differs."""
        self.in_head = False
        start = self.task.get("start_digest")
        self.head_checked = bool(start)
        if start:
            self.capturer.order = start.get(checkpoint.ROOTS) or self.capturer.order
            live = self.capturer.digests()
            reads = probe_state.probe_names(self.task.get("recorded_code") or self.task["code"], self.task["code"])
            self.head_differs = sorted(k for k, v in start.items() if k != checkpoint.ROOTS and not self._excluded(k)
                                       and root(k.partition("/")[2]) in reads and live.get(k) != v)

    def _epochs(self, iterable):
        self._in_loop = True
        head_ran = self.in_head
        if self.in_head:
            self._end_head()
        self.head_ran = head_ran
        if isinstance(iterable, runtime.While):
            # A while loop cannot be fast-forwarded without running its body: restore the state its
            # condition sees at the first replayed iteration, then let the loop go on from there.
            self._enter(self.first)
            units = enumerate(iterable, start=self.first)
        else:
            units = enumerate(iterable)
        emitted, done = 0.0, 0
        digests = self.task["end_digests"]
        for k, item in units:
            if k < self.first:
                continue
            if k > self.last:
                break
            self.epoch, self.step, self.last_step, self.mode = k, None, None, self.modes[k]
            self.unreplayed = set()
            if k == self.first and not isinstance(iterable, runtime.While):
                self._enter(k)
            t = time.perf_counter()
            try:
                yield item
            except GeneratorExit:  # `break` in unit k (a while loop's last iteration): its state, as recorded
                if str(k) in digests:
                    self._verify_quietly(k, digests)
                # The lines after the loop run next (or an error in unit k unwinds: self.epoch still names it)
                self.after_loop, self.in_tail = True, self.tail and k == self.last
                raise
            seconds = time.perf_counter() - t
            done += 1
            if k in self.keep:
                self.epoch_seconds[k] = seconds
            if str(k) in digests:
                self._verify(k, digests, "end")
            now = time.perf_counter()
            if now - emitted > 0.1 or k == self.last:  # an iteration loop runs thousands of units
                emitted = now
                # "done": units this segment has run so far (an iteration loop reports every 0.1 s, not each unit)
                emit({"replay": self.task["replay_id"], "epoch": k, "mode": self.mode, "seconds": seconds,
                      "segment": self.first, "done": done})
            if self.tail and k == self.last:  # the recording's loop ended here: on to the lines after it
                self.epoch, self.in_tail = None, True
                return
        self.epoch = None
        raise _ReplayDone

    def _enter(self, k, snap=None):
        """Put back the state at the start of unit k (the first of the segment)."""
        if self.restore_at is not None:
            self._restore("resume_paths", self.restore_at, snap)
        elif self.modes.get(k) == SKIP:
            # No state for this epoch's start: the state at its step-loop exit is the most
            # plausible one for the code before the step loop (its values are not kept).
            self._restore("step_paths", k)

    # -- the unit API: a framework's callbacks drive it (see flor_nb.frameworks.units) --
    def entry_snapshot(self) -> dict | None:
        """The checkpoint the segment's first unit starts from (read now: a framework may need it
        before its loop starts, to resume at that unit), or None."""
        if self.restore_at is None:
            return None
        t = time.perf_counter()
        snap = checkpoint.read(self.blobs, self.task["resume_paths"][str(self.restore_at)])
        self.restore_seconds += time.perf_counter() - t
        return snap

    def begin_unit(self, k: int, snap: dict | None = None):
        """Unit k starts; the first unit of the segment is entered from its checkpoint (``snap``, if read)."""
        self._in_loop = True
        self.epoch, self.step, self.last_step, self.mode = k, None, None, self.modes.get(k, FULL)
        self.unreplayed = set()
        if k == self.first:
            self._enter(k, snap)
        self._unit_start = time.perf_counter()

    def end_unit(self, k: int, stop: bool = True):
        """Unit k ended: check its state; after the segment's last unit raise ``_ReplayDone`` (``stop``)."""
        seconds = time.perf_counter() - self._unit_start
        if k in self.keep:
            self.epoch_seconds[k] = seconds
        digests = self.task["end_digests"]
        if str(k) in digests:
            self._verify(k, digests, "end")
        emit({"replay": self.task["replay_id"], "epoch": k, "mode": self.mode, "seconds": seconds})
        self.epoch = self.step = None
        if stop and k >= self.last:
            raise _ReplayDone

    def finish_units(self):
        """The framework's loop returned (its last unit ended): the code after it is not replayed."""
        raise _ReplayDone

    def _excluded(self, key: str) -> bool:
        return key in self.exclude or any(key.startswith(e) for e in self.exclude if e.endswith("/"))

    def _verify_quietly(self, k: int, digests: dict):
        """:meth:`_verify` while the loop is being left: an error here must not replace the ``break``."""
        try:
            self._verify(k, digests, "end")
        except Exception as e:  # noqa: BLE001 - the unit stays unchecked, and the verdict says so
            logger.warning("flor_nb: could not check the state of unit %s: %s", k, e)

    def lost_cuda_rng(self):
        """The recording drew from CUDA generators this replay has no counterpart for: say so."""
        info = self.devices
        info["lost_rng"] = sorted(set(info["lost_rng"]) | self._cuda_rng_pending)

    def _verify(self, epoch: int, digests: dict, where: str):
        """Compare every captured stream with its digest recorded at the same point of the same epoch."""
        recorded = digests.get(str(epoch))
        if not recorded:
            return
        self.capturer.order = recorded.get(checkpoint.ROOTS) or self.capturer.order
        live = self.capturer.digests()
        compared = sorted(k for k in recorded if k != checkpoint.ROOTS and not self._excluded(k))
        differ = [k for k in compared if k in live and live[k] != recorded[k]]
        missing = [k for k in compared if k not in live]
        # What a skipped step loop left out and the next epoch recomputes first: not compared (where it differs).
        left_out = sorted(k for k in differ + missing if k in self.unreplayed) if where == "end" else []
        if left_out:
            compared, differ, missing = ([k for k in ks if k not in left_out] for ks in (compared, differ, missing))
        if "rng/cuda" in missing and self._cuda_rng_unplaced is not None:
            if recorded["rng/cuda"] == self._cuda_rng_unplaced:  # nothing drew from them since: not lost
                missing.remove("rng/cuda")
                self._cuda_rng_checked = True
            else:
                self.lost_cuda_rng()
        skipped = sorted(k for k in recorded if k != checkpoint.ROOTS and self._excluded(k))
        self.checks.append({"epoch": epoch, "where": where, "streams": compared, "not_compared": skipped,
                            **({"left_out": left_out} if left_out else {})})
        if differ or missing:
            self.divergence.append({"epoch": epoch, "where": where, "differ": differ, "missing": missing})


def _recorded_devices(snap: dict) -> set:
    out = set()
    for where in (snap["python"].get("devices") or {}).values():
        out.update([where] if isinstance(where, str) else where)
    return out
