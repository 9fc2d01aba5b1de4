"""Progress events of replay workers: a queue a worker's initializer sets, best effort."""
from __future__ import annotations

_events = None  # a multiprocessing queue (or the Dask path's connection) set by use()


def use(queue):
    """Send this process's events to ``queue`` (None: drop them)."""
    global _events
    _events = queue


def emit(event: dict):
    if _events is not None:
        try:
            _events.put_nowait(event)
        except Exception:  # noqa: BLE001 - progress is best effort, never a failure
            pass
