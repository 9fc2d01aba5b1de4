"""A replay running in a background thread: start it, watch its progress, cancel it, take its result.

:func:`start_replay` is :func:`flor_nb.replay` that returns at once with a
:class:`ReplayHandle`, so a notebook (or the panel) stays free while workers run.
The handle knows which epochs have run, which of them are *kept* (their segment
finished, so their values are stored), how long is left, and, after a cancel,
the partial result of the kept epochs.
"""
from __future__ import annotations

import re
import threading
import time

from . import executor as executors
from .executor import ReplayCancelled
from .replay import replay

RUNNING, FINISHED, CANCELLED, FAILED = "running", "finished", "cancelled", "failed"


class ReplayHandle:
    """One replay in a background thread (see :func:`start_replay`).

    ``on_change(handle)`` runs from worker-event and ticker threads while it runs;
    ``on_done(handle)`` once at the end, whatever the outcome.
    """

    def __init__(self, run, code=None, epochs=None, cells=None, workers=None, store=None, plan=None,
                 on_change=None, on_done=None, executor=None):
        self.run, self.code, self.epochs, self.cells, self.store = run, code, epochs, cells, store
        self.workers = workers
        self.total = max((plan or {}).get("epochs_to_run") or 1, 1)
        self.predicted = (plan or {}).get("estimate_seconds")
        self.on_change, self.on_done = on_change, on_done
        self.executor = executors.resolve(executor)
        self.ran: dict[int, float] = {}  # epoch -> seconds, as workers report them
        self.done_by_segment: dict = {}  # first unit of a segment -> units it has run
        self.modes: dict[int, str] = {}
        self.kept: set[int] = set()  # epochs whose segment finished: their values are stored
        self.result = None  # the result frame; after a cancel, the kept epochs only
        self.error: BaseException | None = None
        self.state = None
        self.failed_epoch: int | None = None
        self.replay_id: int | None = None
        self.started = self.ended = None
        self._cancel_asked = False
        self._thread = threading.Thread(target=self._run, name="flor-replay", daemon=True)
        self._ticker = threading.Thread(target=self._tick, name="flor-replay-clock", daemon=True)
        self._done = threading.Event()

    # -- lifecycle ---------------------------------------------------------------

    @property
    def units_done(self) -> int:
        """Units (epochs, iterations) run so far, also where progress events were sampled."""
        return max(len(self.ran), sum(self.done_by_segment.values()))
    def start(self) -> ReplayHandle:
        self.started = time.perf_counter()
        self.state = RUNNING
        self._thread.start()
        self._ticker.start()
        return self

    def _run(self):
        try:
            self.result = replay(self.run, code=self.code, epochs=self.epochs, cells=self.cells, workers=self.workers,
                                 store=self.store, on_event=self._event, executor=self.executor)
            self.kept = set(self.result.attrs.get("epochs") or ())
            self.state = FINISHED
        except ReplayCancelled as e:
            self.error, self.result = e, e.result
            self.kept = set((e.result.attrs.get("epochs") if e.result is not None else None) or ())
            self.state = CANCELLED
        except BaseException as e:  # noqa: BLE001 - handed to on_done and .error, never swallowed
            self.error = e
            self.state = CANCELLED if self._cancel_asked else FAILED
            self.failed_epoch = _epoch_of(e)
        finally:
            self.ended = time.perf_counter()
            try:
                if self.on_done is not None:
                    self.on_done(self)
            finally:
                self._done.set()

    def _event(self, event: dict):
        if "plan" in event:  # sent by replay() itself, first: which replay the worker events belong to
            self.replay_id = event.get("replay")
            return
        if event.get("replay") != self.replay_id:  # a late event of an earlier replay on the same workers
            return
        if "epoch" in event:
            self.ran[int(event["epoch"])] = float(event.get("seconds") or 0.0)
            if "segment" in event:  # iteration loops report every 0.1 s, with how many units ran so far
                self.done_by_segment[event["segment"]] = int(event.get("done") or 0)
            if "mode" in event:
                self.modes[int(event["epoch"])] = event["mode"]
        elif "segment_done" in event:
            self.kept.update(int(e) for e in event.get("kept") or ())
        else:
            return
        self._changed()

    def _tick(self):
        while not self._done.wait(0.5):
            self._changed()

    def _changed(self):
        if self.on_change is not None:
            try:
                self.on_change(self)
            except Exception:  # noqa: BLE001, S110 - a display glitch must not stop the replay
                pass

    def cancel(self):
        """Stop the workers now. Epochs whose segment finished keep their values (``result``)."""
        if not self._done.is_set():
            self._cancel_asked = True
            self.executor.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the replay ends; True if it ended."""
        return self._done.wait(timeout)

    # -- progress ----------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.started is not None and self.ended is None

    @property
    def cancelled(self) -> bool:
        return self._cancel_asked or self.state == CANCELLED

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.ended or time.perf_counter()) - self.started

    @property
    def remaining(self) -> float | None:
        """Seconds left: epochs not run times the seconds per epoch seen so far (else as predicted)."""
        seen = list(self.ran.values())
        left = max(self.total - len(seen), 0)
        workers = max(self.workers or 1, 1)
        if seen:
            return left * (sum(seen) / len(seen)) / workers
        return None if self.predicted is None else self.predicted * left / self.total

    def progress(self) -> dict:
        """A snapshot: state, epochs run and kept, elapsed and remaining seconds."""
        return {"state": self.state, "ran": dict(self.ran), "kept": sorted(self.kept), "total": self.total,
                "elapsed": self.elapsed, "remaining": self.remaining, "failed_epoch": self.failed_epoch}


def _epoch_of(error) -> int | None:
    """The epoch a replay error names ("... in epoch 3, step 2."), if any."""
    m = re.search(r"\bin epoch (\d+)\b", str(getattr(error, "args", [""])[0] if getattr(error, "args", None) else ""))
    return int(m.group(1)) if m else None


def start_replay(run, code=None, epochs=None, cells=None, workers=None, store=None, plan=None, on_change=None,
                 on_done=None, executor=None) -> ReplayHandle:
    """:func:`flor_nb.replay` in a background thread; returns its :class:`ReplayHandle` at once.

    ``plan`` (:func:`flor_nb.api.estimate`'s answer) sizes the progress and the time left.
    """
    return ReplayHandle(run, code, epochs, cells, workers, store, plan, on_change, on_done, executor).start()
