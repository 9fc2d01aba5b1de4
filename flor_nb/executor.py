"""Where replay segments run. The planner hands tasks to an executor; executors are swappable.

:class:`LocalExecutor` keeps a warm pool of worker processes started by a
``forkserver`` that has already imported torch, so a second replay of the same
run pays no process or import start-up. Any object with ``run(fn, tasks,
on_event)`` and ``cancel()`` can take its place (a Dask or Ray client, say).

There is one pool per process, sized from the CPUs this process may use. A pool
whose worker died (out of memory, killed) is replaced, and the replay that was
running says which worker died of what; workers exit when their owner dies.
"""
from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import types
from concurrent.futures import CancelledError, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

from . import machine
from .errors import FlorError, ReplayError


class ReplayCancelled(FlorError):
    """The replay was cancelled. ``results``: per task, its result if it finished, else None;
    after :func:`flor_nb.replay` handled it, ``result`` is the frame of the finished epochs."""

    def __init__(self, message, results=()):
        super().__init__(message, list(results))
        self.results = list(results)
        self.result = None

    def __str__(self):
        return self.args[0]


# torch._dynamo loads lazily on the first optimizer (~1 s): have the server pay for it once.
_PRELOAD = ["torch", "torch._dynamo", "numpy", "flor_nb.worker"]
_STOP = "__flor_pump_stop__"  # put on the event queue when a run ends: its pump stops at once


def prestart(store=None):
    """Start the replay workers now, so the first replay (after a kernel restart too) starts warm.

    The workers fork from a server that has imported torch, run one small torch op
    each, and import what the latest recorded run's cells import (scikit-learn, say).
    The extension calls this on ``%load_ext flor_nb``; scripts may call it early.
    Returns at once: the work happens in the new processes. (Starting the first worker waits
    for the forkserver to import torch, seconds; in a kernel that wait happens on a thread.)
    """
    from . import worker

    ex = local()
    modules = _recent_imports(store)

    def start():
        for _ in range(ex.workers):
            ex._pool.submit(worker.warm_up, modules)

    main = sys.modules.get("__main__")
    if getattr(main, "__file__", None) is None and getattr(main, "__spec__", None) is None:
        # A kernel's __main__ is not a file the workers would import: no need to hide it, so the
        # notebook need not wait for the forkserver.
        threading.Thread(target=_quietly, args=(start,), name="flor_nb-prestart", daemon=True).start()
    else:
        with _no_main():
            start()


def _quietly(fn):
    try:
        fn()
    except Exception:  # noqa: BLE001 - a warm start is an optimisation; replay starts workers itself
        pass


def _recent_imports(store) -> list[str]:
    """Top-level modules imported by the dependency cells of the store's latest run."""
    import ast

    from .store import Store, default_home

    home = store or default_home()
    if not (os.path.exists(os.path.join(home, "flor.db"))):
        return []
    try:
        runs = Store(home).all_runs()
    except Exception:  # noqa: BLE001 - warming up is best effort
        return []
    from .signing import run_verifies

    if not runs or not run_verifies(runs[-1]):  # module names from a store you did not sign: import nothing
        return []
    names = set()
    for cell in runs[-1].deps:
        try:
            tree = ast.parse(cell["source"])
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
    return sorted(names)


def context():
    """The start method of flor_nb's processes (replay workers, the checkpoint saver): ``forkserver`` with torch
    imported in the server where the platform has it (never fork: it deadlocks torch); spawn elsewhere (Windows)."""
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)
        with _sigint_ignored():
            from multiprocessing import forkserver

            forkserver.ensure_running()
    return ctx


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored while the forkserver is spawned, so it starts ignoring it (a disposition survives exec; a
    blocked mask does not: the server's was empty). Jupyter interrupts a kernel by signalling its process group,
    and the forkserver ignores SIGINT only once it has imported torch, seconds after ``%load_ext``: an interrupt
    then killed it, and the next replay started it cold. Its children (replay workers, the saver) ignore SIGINT
    anyway. Only the main thread may change it; the spawn takes a few milliseconds."""
    old = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or old is None:  # None: set outside Python
        yield
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


class LocalExecutor:
    """Worker processes on this machine (``forkserver``, never ``fork``)."""

    def __init__(self, workers: int):
        self.workers = workers
        ctx = self._ctx = context()
        self._events = ctx.Queue()
        self._pool = self._new_pool()
        self._cancelled = threading.Event()
        self._started: set = set()

    def _new_pool(self) -> ProcessPoolExecutor:
        from . import worker

        # Workers watch this process: they exit when it dies, even by SIGKILL.
        return ProcessPoolExecutor(self.workers, mp_context=self._ctx, initializer=worker.init,
                                   initargs=(self._events, os.getpid()))

    def _healthy(self) -> ProcessPoolExecutor:
        """The pool, replaced first if one of its workers died since it was last used (asked of each
        worker: the pool itself notices a death only a moment later)."""
        procs = list((getattr(self._pool, "_processes", None) or {}).values())
        if getattr(self._pool, "_broken", False) or any(p.exitcode is not None for p in procs):
            self._replace()
        return self._pool

    def _replace(self):
        old, self._pool = self._pool, self._new_pool()
        for p in list((getattr(old, "_processes", None) or {}).values()):
            with contextlib.suppress(Exception):
                p.terminate()
        with contextlib.suppress(Exception):
            old.shutdown(wait=False, cancel_futures=True)

    def run(self, fn, tasks: list, on_event=None) -> list:
        """Run ``fn(task)`` for each task; return results in task order.

        After :meth:`cancel`, raises :class:`ReplayCancelled` holding the results that finished.
        If a worker dies, raises :class:`ReplayError` saying which and of what; the pool is replaced.
        """
        results: list = [None] * len(tasks)
        for retry in (True, False):
            if self._cancelled.is_set():
                raise ReplayCancelled("Replay cancelled before it started.", results)
            try:
                return self._run(fn, tasks, on_event, results, retry)
            except _Idle:  # a worker had died before any of these tasks began: once more, on a new pool
                self._replace()

    def _run(self, fn, tasks, on_event, results, retry):
        oom_before = machine.oom_kills()
        self._started = set()  # pids of the workers that began a segment (run_segment says so first thing)
        try:
            pool = self._healthy()
            with _no_main():
                futures = {pool.submit(fn, t): i for i, t in enumerate(tasks)}
        except BrokenProcessPool:  # broke between the check and the submit: once more on a new pool
            self._replace()
            pool = self._pool
            with _no_main():
                futures = {pool.submit(fn, t): i for i, t in enumerate(tasks)}
        except RuntimeError:  # cancelled while submitting: the pool is shut down
            raise ReplayCancelled("Replay cancelled before it started.", results) from None
        procs = dict(getattr(pool, "_processes", None) or {})
        stop = threading.Event()
        pump = threading.Thread(target=self._pump, args=(on_event, stop), daemon=True)
        pump.start()
        try:
            for fut in as_completed(futures):
                try:
                    results[futures[fut]] = fut.result()
                except (BrokenProcessPool, CancelledError):
                    if self._cancelled.is_set():
                        raise ReplayCancelled("Replay cancelled; the segments that finished are kept.",
                                              results) from None
                    time.sleep(0.2)  # the started events of segments that did begin arrive
                    self._drain(on_event)
                    message, dead = _death(procs, oom_before)
                    if retry and not any(results) and not (set(dead) & self._started):
                        raise _Idle from None  # it died idle: none of this replay's segments ran on it
                    self._replace()
                    raise ReplayError(message) from None
                except BaseException:
                    for other in futures:  # the replay failed: do not leave its other segments queued
                        other.cancel()
                    raise
        finally:
            stop.set()
            with contextlib.suppress(Exception):  # wake the pump now, not at its next 50 ms poll
                self._events.put({_STOP: True})
            pump.join(timeout=2)
        return results

    def _pump(self, on_event, stop):
        while not stop.is_set():
            try:
                event = self._events.get(timeout=0.05)
            except (queue.Empty, OSError, EOFError):
                continue
            self._deliver(event, on_event)

    def _drain(self, on_event):
        while True:
            try:
                event = self._events.get_nowait()
            except (queue.Empty, OSError, EOFError):
                return
            self._deliver(event, on_event)

    def _deliver(self, event, on_event):
        if _STOP in event:  # a run's end: this one's, or one a pump that had stopped left behind
            return
        if "started" in event:  # for the executor only: which workers began a segment
            self._started.add(event.get("pid"))
            return
        if on_event is not None:
                try:
                    on_event(event)
                except Exception:  # noqa: BLE001 - a broken progress callback must not stop replay
                    pass

    def cancel(self):
        """Stop the workers now; the pool is rebuilt on the next replay."""
        global _POOL
        self._cancelled.set()
        for p in list((getattr(self._pool, "_processes", None) or {}).values()):
            p.terminate()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if _POOL is self:
            _POOL = None

    def shutdown(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _no_main():
    """Start workers without re-importing the caller's ``__main__``.

    Replay ships cell sources, not pickled functions, so workers never need the
    user's script or kernel module; importing a script without an
    ``if __name__ == "__main__"`` guard would re-run it in every worker.
    """
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved


def _death(procs: dict, oom_before) -> tuple[str, list]:
    """Which worker died, and of what (signal, exit code, the out-of-memory killer), in words; and their pids."""
    deadline = time.monotonic() + 2
    dead = []
    while time.monotonic() < deadline:
        dead = [(pid, p.exitcode) for pid, p in procs.items()
                if p.exitcode not in (None, 0, -signal.SIGTERM)]  # SIGTERM: the pool ending its other workers
        if dead:
            break
        time.sleep(0.05)
    oom = machine.oom_kills()
    by_oom = oom is not None and oom_before is not None and oom > oom_before
    if dead:
        pid, code = dead[0]
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            what = f"was killed by signal {-code} ({name})"
        else:
            what = f"exited with code {code}"
        head = f"A replay worker (pid {pid}) {what}"
    else:
        head = "A replay worker died"
    if by_oom:
        cause = (": the system's out-of-memory killer ended it (memory ran out). Replay fewer epochs or with "
                 "fewer workers")
    elif dead and dead[0][1] == -signal.SIGKILL:
        cause = " (out of memory, or killed by hand). If memory is short, replay fewer epochs or with fewer workers"
    else:
        cause = ". Its replay is lost"
    return f"{head}{cause}. The worker pool was replaced: the next replay starts fresh workers.", [p for p, _ in dead]


class _Idle(Exception):
    """The pool broke because a worker that ran none of this replay's segments died (it was idle)."""


_POOL: LocalExecutor | None = None

ENV = "FLOR_NB_EXECUTOR"  # the default executor: "local", or a Dask scheduler ("dask://host:8786")


def resolve(executor=None):
    """The executor for a replay: ``executor`` (a ``distributed.Client``, ``"dask://host:port"``,
    ``"local"``, or any object with ``run``/``cancel``), else ``$FLOR_NB_EXECUTOR``, else the local pool."""
    if executor is None:
        executor = os.environ.get(ENV) or None
    if executor is None or executor == "local":
        return local()
    if isinstance(executor, str) or type(executor).__module__.split(".")[0] == "distributed":
        from . import dask_executor  # a Client has run() and cancel() too, with other meanings: wrap it

        return dask_executor.executor(executor)
    return executor


def slots(executor=None) -> int | None:
    """How many segments ``executor`` (as :func:`resolve` takes it) runs at once when it is not this machine's
    pool, else None (this machine's cores decide). Asks a cluster for its workers; never starts the local pool."""
    if executor is None:
        executor = os.environ.get(ENV) or None
    if executor is None or executor == "local" or isinstance(executor, LocalExecutor):
        return None
    return getattr(resolve(executor), "slots", None)


def local(workers: int | None = None) -> LocalExecutor:
    """The warm executor: one per process, with one worker per usable CPU, created once and reused.

    Each task sets its own torch thread count, so one pool serves every run; ``workers`` is kept
    for callers that passed it and is ignored (a replay submits at most as many tasks as it uses).
    """
    global _POOL
    if _POOL is None:
        _POOL = LocalExecutor(machine.usable_cpus())
    return _POOL


@atexit.register
def _shutdown_all():
    global _POOL
    if _POOL is not None:
        try:
            _POOL.shutdown()
        except Exception:  # noqa: BLE001
            pass
    _POOL = None
