"""Where replay segments run. The planner hands tasks to an executor; executors are swappable.

:class:`LocalExecutor` keeps a warm pool of worker processes started by a
``forkserver`` that has already imported torch, so a second replay of the same
run pays no process or import start-up. Any object with ``run(fn, tasks,
on_event)`` and ``cancel()`` can take its place (a Dask or Ray client, say).
"""
from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import os
import queue
import sys
import threading
import types
from concurrent.futures import CancelledError, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

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


def prestart(store=None):
    """Start the replay workers now, so the first replay (after a kernel restart too) starts warm.

    The workers fork from a server that has imported torch, run one small torch op
    each, and import what the latest recorded run's cells import (scikit-learn, say).
    The extension calls this on ``%load_ext flor_nb``; scripts may call it early.
    Returns at once: the work happens in the new processes.
    """
    from . import worker

    ex = local()
    modules = _recent_imports(store)
    with _no_main():
        for _ in range(ex.workers):
            ex._pool.submit(worker.warm_up, modules)


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
    names = set()
    for cell in runs[-1].deps if runs else []:
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


class LocalExecutor:
    """Worker processes on this machine (``forkserver``, never ``fork``)."""

    def __init__(self, workers: int):
        self.workers = workers
        # forkserver where the platform has it (never fork: it deadlocks torch); spawn elsewhere (Windows)
        ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        if ctx.get_start_method() == "forkserver":
            ctx.set_forkserver_preload(_PRELOAD)
        self._events = ctx.Queue()
        from . import worker

        self._pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=worker.init,
                                         initargs=(self._events,))
        self._cancelled = threading.Event()

    def run(self, fn, tasks: list, on_event=None) -> list:
        """Run ``fn(task)`` for each task; return results in task order.

        After :meth:`cancel`, raises :class:`ReplayCancelled` holding the results that finished.
        """
        results: list = [None] * len(tasks)
        if self._cancelled.is_set():
            raise ReplayCancelled("Replay cancelled before it started.", results)
        try:
            with _no_main():
                futures = {self._pool.submit(fn, t): i for i, t in enumerate(tasks)}
        except RuntimeError:  # cancelled while submitting: the pool is shut down
            raise ReplayCancelled("Replay cancelled before it started.", results) from None
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
                    raise ReplayError("A replay worker died (out of memory, or killed). Try fewer workers.") from None
        finally:
            stop.set()
            pump.join(timeout=2)
        return results

    def _pump(self, on_event, stop):
        while not stop.is_set():
            try:
                event = self._events.get(timeout=0.05)
            except (queue.Empty, OSError, EOFError):
                continue
            if on_event is not None:
                try:
                    on_event(event)
                except Exception:  # noqa: BLE001 - a broken progress callback must not stop replay
                    pass

    def cancel(self):
        """Stop the workers now; the pool is rebuilt on the next replay."""
        self._cancelled.set()
        for p in list(getattr(self._pool, "_processes", {}).values()):
            p.terminate()
        self._pool.shutdown(wait=False, cancel_futures=True)
        _POOLS.pop(self.workers, None)

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


_POOLS: dict = {}
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


def local(workers: int | None = None) -> LocalExecutor:
    """The warm executor: one process per core (by default), created once and reused.

    Each task sets its own torch thread count, so one pool serves every run.
    """
    workers = workers or os.cpu_count() or 1
    ex = _POOLS.get(workers)
    if ex is None:
        ex = _POOLS[workers] = LocalExecutor(workers)
    return ex


@atexit.register
def _shutdown_all():
    for ex in list(_POOLS.values()):
        try:
            ex.shutdown()
        except Exception:  # noqa: BLE001
            pass
    _POOLS.clear()
