"""A replay running in a background thread, so the kernel stays free and the panel keeps updating."""
from __future__ import annotations

import threading
import time

import flor_nb
from flor_nb import executor as executors


class ReplayJob:
    """``flor_nb.replay(...)`` in a thread, with per-epoch progress and a cancel.

    ``plan`` is :func:`flor_nb.probes.estimate`'s answer for the same request:
    the workers, threads and epochs to expect, and the time it predicts.
    ``on_change(job)`` is called from worker-event and ticker threads;
    ``on_done(job)`` once at the end.
    """

    def __init__(self, run, code, epochs, store, plan, on_change=None, on_done=None):
        self.run, self.code, self.epochs, self.store = run, code, epochs, store
        self.workers = plan["workers"]
        self.total = max(plan["epochs_to_run"], 1)
        self.predicted = plan.get("estimate_seconds")
        self.on_change, self.on_done = on_change, on_done
        # the executor replay will use, held here so Cancel can stop it
        self.executor = executors.local()
        self.finished_epochs: dict[int, float] = {}
        self.modes: dict[int, str] = {}
        self.result = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.started = self.ended = None
        self._thread = threading.Thread(target=self._run, name="flor-replay", daemon=True)
        self._ticker = threading.Thread(target=self._tick, name="flor-replay-clock", daemon=True)
        self._done = threading.Event()

    def start(self) -> ReplayJob:
        self.started = time.perf_counter()
        self._thread.start()
        self._ticker.start()
        return self

    def _run(self):
        try:
            self.result = flor_nb.replay(self.run, code=self.code, epochs=self.epochs, workers=self.workers,
                                         store=self.store, on_event=self._event, executor=self.executor)
        except BaseException as e:  # noqa: BLE001 - shown in the panel by on_done, never swallowed
            self.error = e
        finally:
            self.ended = time.perf_counter()
            try:
                if self.on_done is not None:
                    self.on_done(self)
            finally:
                self._done.set()

    def _event(self, event: dict):
        if "epoch" in event:
            self.finished_epochs[int(event["epoch"])] = float(event.get("seconds") or 0.0)
            if "mode" in event:
                self.modes[int(event["epoch"])] = event["mode"]
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
        """Stop the workers now (the executor's cancel); the replay thread then ends."""
        if not self._done.is_set():
            self.cancelled = True
            self.executor.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the replay ends (for scripts and tests); True if it ended."""
        return self._done.wait(timeout)

    @property
    def running(self) -> bool:
        return self.started is not None and self.ended is None

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.ended or time.perf_counter()) - self.started

    @property
    def remaining(self) -> float | None:
        """Seconds left: epochs not done times the seconds per epoch seen so far (else as predicted)."""
        seen = list(self.finished_epochs.values())
        left = max(self.total - len(seen), 0)
        if seen:
            return left * (sum(seen) / len(seen)) / max(self.workers, 1)
        return None if self.predicted is None else self.predicted * left / self.total
