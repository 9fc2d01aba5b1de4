"""A background thread that writes checkpoints in order, off the training loop (log rows are stored at
each epoch's end by the recorder itself, so they never wait behind checkpoint bytes)."""
from __future__ import annotations

import os
import queue
import threading
import time


class Writer:
    """Runs submitted jobs one at a time, in order, on a daemon thread.

    At most one checkpoint is in flight: :meth:`submit_checkpoint` blocks while
    the previous one is still being written (bounded memory), and reports how
    long it waited so the recorder can widen its checkpoint period.
    """

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        self._slot = threading.Semaphore(1)
        self.errors: list[BaseException] = []
        self.busy_seconds = 0.0
        self.cpu_seconds = 0.0  # CPU time of the writer thread, set when it ends (the bench accounts for it)
        self._thread = threading.Thread(target=self._loop, name="flor_nb-writer", daemon=True)
        self._thread.start()

    def _loop(self):
        try:  # Linux: a thread has its own nice value; let training threads win the cores
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while True:
            job = self._jobs.get()
            if job is None:
                self.cpu_seconds = time.thread_time()
                return
            fn, args = job
            start = time.perf_counter()
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 - reported to the recorder, never lost
                self.errors.append(e)
            finally:
                self.busy_seconds += time.perf_counter() - start
                self._slot.release()

    def busy(self) -> bool:
        """A checkpoint is still being written."""
        if self._slot.acquire(blocking=False):
            self._slot.release()
            return False
        return True

    def submit_checkpoint(self, fn, *args) -> float:
        """Queue a checkpoint write; returns the seconds spent waiting for the previous one."""
        start = time.perf_counter()
        self._slot.acquire()
        waited = time.perf_counter() - start
        self._jobs.put((fn, args))
        return waited

    def drain(self) -> float:
        """Wait until the checkpoint in flight is written; returns the seconds waited."""
        start = time.perf_counter()
        self._slot.acquire()
        self._slot.release()
        return time.perf_counter() - start

    def close(self):
        """Wait until everything submitted is written."""
        self._jobs.put(None)
        self._thread.join()
