"""Replay segments as tasks on a Dask cluster (``pip install flor_nb[dask]``).

``flor.replay(run, ..., executor=client)`` with a ``distributed.Client``, or
``executor="dask://host:8786"``, or ``FLOR_NB_EXECUTOR=dask://host:8786``, runs each
segment as one Dask task instead of on this machine's pool. The SQLite index stays
here: tasks read checkpoints from the run's blob location (a folder the workers
share, or a URL such as ``s3://bucket/prefix``, see :mod:`flor_nb.objstore`) and
return rows; the notebook writes them. So the workers need flor_nb, torch and what
the recorded cells import, and read access to the blob location.

- Tasks are submitted with ``pure=False``: two replays of one segment are two runs.
- Each task sets the recorded torch thread count (``worker.run_segment``); a worker runs one segment at a
  time, whatever its thread count (they would share the child's global RNGs).
- Progress: tasks ``log_event`` on a topic of this replay; the notebook
  ``subscribe_topic``s to it and hands each event to the same callback the local
  pool feeds (progress bar, panel).
- Cancel cancels the futures and stops the running tasks (Dask cannot interrupt a
  running task: the workers are told, and end the process that runs the segment).
- A worker that dies mid-task (killed, out of memory) is retried by Dask up to
  ``distributed.scheduler.allowed-failures`` times; after that the replay fails
  with an error naming the segment and what happened.
- Segments run in one warm child process per Dask worker, not in the worker:
  the worker's own threads draw from Python's global ``random`` while a task runs
  (state the replay restores and checks), and its process is daemonic, so a
  DataLoader with ``num_workers > 0`` could not start its workers there. After each
  segment, modules imported from the run's folder are dropped (an edited
  ``model.py`` is imported afresh) and CUDA's cached memory is released.
"""
from __future__ import annotations

import gc
import os
import sys
import threading
import time
import uuid
from pathlib import Path

from .errors import FlorError, ReplayError
from .executor import ReplayCancelled

_CLIENTS: dict = {}  # scheduler address -> Client opened for it
_STOPPED: set = set()  # in a worker process: topics of cancelled replays
# In a worker process: one segment at a time, in its one child process (segments share its global RNGs,
# __main__ and the active flor session).
_ONE_AT_A_TIME = threading.Lock()


class DaskUnavailable(FlorError):
    """The Dask executor was asked for without ``distributed`` installed, or its scheduler cannot be reached."""


def close_clients() -> None:
    """Close the clients opened for ``dask://`` addresses. A client whose scheduler went away keeps
    reconnecting in this process's background, and its retries draw from Python's global random."""
    for client in list(_CLIENTS.values()):
        client.close()
    _CLIENTS.clear()


def executor(target) -> DaskExecutor:
    """A :class:`DaskExecutor` for a ``distributed.Client`` or a scheduler address (``dask://host:8786``)."""
    if not isinstance(target, str):
        return DaskExecutor(target)
    address = "tcp://" + target.removeprefix("dask://") if target.startswith("dask://") else target
    client = _CLIENTS.get(address)
    if client is None or client.status not in ("running", "connecting"):
        try:
            from distributed import Client
        except ImportError:
            raise DaskUnavailable(f"Replay on {target} needs Dask: pip install 'flor_nb[dask]'.") from None
        try:
            client = _CLIENTS[address] = Client(address, timeout=10, set_as_default=False)
        except (OSError, TimeoutError) as e:
            raise DaskUnavailable(f"Cannot reach the Dask scheduler at {address}: {e}. Start it (dask scheduler) "
                                  f"or fix {target!r} (FLOR_NB_EXECUTOR, --executor).") from None
    return DaskExecutor(client)


def prestart(client, modules=()) -> dict:
    """Start each worker's replay process now (it imports torch and ``modules``), so the first replay starts
    warm; returns {worker address: replay process id}. Blocks until they are ready (a second or two)."""
    workers = list(client.nthreads())
    futures = [client.submit(_warm, list(modules), pure=False, workers=[w], allow_other_workers=False)
               for w in workers]
    return dict(zip(workers, client.gather(futures)))


class DaskExecutor:
    """Segments as Dask tasks on ``client``'s cluster; one replay per executor object (cancel ends it)."""

    def __init__(self, client):
        self.client = client
        self._futures: list = []
        self._topic = f"flor-nb-{uuid.uuid4().hex}"
        self._cancelled = threading.Event()

    @property
    def slots(self) -> int:
        """Segments the cluster runs at once: one per worker process (see :func:`_task`)."""
        return max(1, len(self.client.nthreads()))

    def run(self, fn, tasks: list, on_event=None) -> list:
        """Run ``fn(task)`` for each task on the cluster; return results in task order."""
        from distributed import as_completed
        from distributed.scheduler import KilledWorker

        results: list = [None] * len(tasks)
        if self._cancelled.is_set():
            raise ReplayCancelled("Replay cancelled before it started.", results)
        done_events = []

        def handle(event):  # on the client's event loop thread
            _, msg = event
            if isinstance(msg, dict) and "segment_done" in msg:
                done_events.append(msg["segment_done"])
            if on_event is not None:
                try:
                    on_event(msg)
                except Exception:  # noqa: BLE001 - a broken progress callback must not stop replay
                    pass

        self.client.subscribe_topic(self._topic, handle)
        index = {}
        try:
            for i, task in enumerate(tasks):
                seg = task["segment"]
                fut = self.client.submit(_task, fn, {**task, "arrays": "return"}, self._topic, pure=False,
                                         key=f"flor-replay-{task['label']}-{seg['first']}-{seg['last']}-{uuid.uuid4().hex[:8]}")
                index[fut.key] = i
                self._futures.append(fut)
            # On this client's loop: a kernel that only named a dask:// address has no default client.
            for fut in as_completed(self._futures, loop=self.client.loop):
                i = index[fut.key]
                try:
                    results[i] = fut.result()
                except KilledWorker as e:
                    if self._cancelled.is_set():
                        continue
                    raise ReplayError(_killed_message(tasks[i], e)) from None
                except Exception as e:  # noqa: BLE001 - a cancelled future, or the task's own error
                    if self._cancelled.is_set():
                        continue
                    if isinstance(e, FlorError):
                        raise
                    if type(e).__name__ in ("FutureCancelledError", "CancelledError"):
                        raise ReplayError(f"The Dask task of {_segment(tasks[i])} was cancelled by someone else "
                                          "(another client, or the cluster shut down). Replay again.") from None
                    raise ReplayError(f"{_segment(tasks[i])} failed on the Dask cluster: {type(e).__name__}: {e}") from e
            if self._cancelled.is_set() or any(r is None for r in results):
                raise ReplayCancelled("Replay cancelled; the segments that finished are kept.", results)
            _wait_for(lambda: len(done_events) >= len(tasks), 2.0)  # the last progress events trail the results
        finally:
            if any(not f.done() for f in self._futures):  # an error: stop what still runs
                self._stop()
            self.client.unsubscribe_topic(self._topic)
        return [_store_arrays(t, r) for t, r in zip(tasks, results)]

    def cancel(self):
        """Cancel the futures; each running task ends its worker's replay process (the next task starts one)."""
        self._cancelled.set()
        self._stop()

    def _stop(self):
        try:
            self.client.cancel([f for f in self._futures if not f.done()])
            self.client.run(_stop_topic, self._topic)
        except Exception:  # noqa: BLE001 - the cluster may be gone already; nothing left to stop then
            pass


def _segment(task) -> str:
    seg = task["segment"]
    span = f"{seg['first']}" if seg["first"] == seg["last"] else f"{seg['first']}-{seg['last']}"
    return f"the segment of epochs {span} of {task['label']}"


def _killed_message(task, error) -> str:
    tries = getattr(error, "allowed_failures", None)
    worker = getattr(getattr(error, "last_worker", None), "address", None)
    return (f"A Dask worker died while replaying {_segment(task)}"
            + (f" (last on {worker})" if worker else "")
            + f": killed, out of memory, or crashed; Dask gave up after {tries + 1 if tries is not None else 'its'} "
            "tries (distributed.scheduler.allowed-failures). Check the worker's log and memory limit, then "
            "replay again (fewer epochs per replay need less memory).")


def _wait_for(condition, seconds):
    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.01)


def _store_arrays(task, result):
    """Arrays a probe logged come back in the rows: store them here, in the notebook's store, as a local
    replay does."""
    import numpy as np

    from . import runtime
    from .rows import save_array

    if not any(isinstance(r[4], np.ndarray) for r in result["rows"]):
        return result
    home = Path(task["home"])
    rows = []
    for name, epoch, step, seq, value in result["rows"]:
        if isinstance(value, np.ndarray):
            value = runtime.encode(save_array(home / "artifacts" / f"{task['run_id']}-h", home, name, epoch, step,
                                              seq, value))
        rows.append((name, epoch, step, seq, value))
    return {**result, "rows": rows}


# -- in the worker process -----------------------------------------------------------
#
# A Dask worker process is no place to run a segment: its event loop thread draws from Python's global
# `random` module while a task runs (dask.sizeof samples collections with random.sample), which is state the
# replay restores and checks; it is daemonic, so a DataLoader cannot start workers in it; and it keeps imported
# modules and CUDA memory between tasks. So each worker keeps one warm child process (a plain subprocess, not
# daemonic) that runs the segments, and relays its progress events to Dask's event log.


class _Child:
    """The replay process of this Dask worker: started on its first task, reused, restarted when it died."""

    def __init__(self):
        import socket
        import subprocess
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"from flor_nb.dask_executor import _child_main; _child_main({theirs.fileno()})"],
            pass_fds=[theirs.fileno()])
        theirs.close()
        self.conn = Connection(ours.detach())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        self.conn.close()


_CHILD: list = []  # this worker's _Child, once started


def _task(fn, task, topic):
    """One segment, run by this Dask worker's replay process; progress goes to ``topic``. None when cancelled."""
    from distributed import get_worker

    with _ONE_AT_A_TIME:
        if not _CHILD or not _CHILD[0].alive():
            _CHILD[:] = [_Child()]
        child = _CHILD[0]
        log = get_worker().log_event
        child.conn.send((fn, task))
        while True:
            if topic in _STOPPED:  # cancelled: the quickest stop is the process's end; the next task starts another
                child.kill()
                return None
            try:
                ready = child.conn.poll(0.05)
                message = child.conn.recv() if ready else None
            except (EOFError, OSError):
                message = None
            if message is None:
                if child.alive():
                    continue
                code = child.proc.wait()
                raise ReplayError(f"The replay process of Dask worker {get_worker().address} died while replaying "
                                  f"{_segment(task)} (exit code {code}: killed, or out of memory). Replay again; "
                                  "with fewer epochs per replay, or more memory per worker, if it happens again.")
            kind, payload = message
            if kind == "event":
                log(topic, payload)
            elif kind == "result":
                return payload
            else:
                raise payload


def _warm(modules):
    from . import worker

    with _ONE_AT_A_TIME:
        if not _CHILD or not _CHILD[0].alive():
            _CHILD[:] = [_Child()]
        _CHILD[0].conn.send((worker.warm_up, modules))
        kind, payload = _CHILD[0].conn.recv()
    if kind == "error":
        raise payload
    return payload


class _Events:
    """The child's event queue: each event goes up the pipe to the Dask worker."""

    def __init__(self, conn):
        self.conn = conn

    def put_nowait(self, event):
        try:
            self.conn.send(("event", event))
        except OSError:  # the Dask worker is gone (killed): stop the segment, not just its progress events
            raise SystemExit(1) from None


def _child_main(fd: int):
    """The replay process: run segments sent by the Dask worker until it goes away."""
    import pickle
    from multiprocessing.connection import Connection

    from . import replay_events, worker

    conn = Connection(fd)
    worker.init(None)
    replay_events.use(_Events(conn))
    while True:
        try:
            fn, task = conn.recv()
        except (EOFError, OSError):  # the Dask worker ended (or was killed): so does this process
            return
        before = set(sys.modules)
        try:
            reply = ("result", fn(task))
        except Exception as e:  # noqa: BLE001 - sent back, raised in the Dask task
            try:
                pickle.dumps(e)
            except Exception:  # noqa: BLE001 - an exception that does not pickle goes back as text
                e = ReplayError(f"{_segment(task)} failed: {type(e).__name__}: {e}")
            reply = ("error", e)
        finally:
            _forget_user_modules(before, task.get("cwd") if isinstance(task, dict) else None)
            _free_gpu_memory()
        conn.send(reply)


def _stop_topic(topic, dask_worker=None):
    _STOPPED.add(topic)


def _forget_user_modules(before, cwd):
    """Modules the task imported from the run's folder (``model.py``): the next task imports them afresh."""
    if not cwd:
        return
    root = os.path.abspath(cwd) + os.sep
    for name in set(sys.modules) - before:
        path = getattr(sys.modules.get(name), "__file__", None) or ""
        if path and os.path.abspath(path).startswith(root) and "site-packages" not in path:
            sys.modules.pop(name, None)


def _free_gpu_memory():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()
