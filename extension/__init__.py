"""IPython extension: ``%load_ext flor_nb`` registers ``%%flor`` / ``%flor`` and binds ``flor``."""
from __future__ import annotations

import warnings

import flor_nb
from flor_nb import cpu_math

from .magics import FlorMagics
from .tracker import CellTracker

_trackers: dict = {}


def load_ipython_extension(ip):
    old = _trackers.pop(id(ip), None)
    if old is not None:
        old.unregister()
    tracker = CellTracker(ip)
    tracker.register()
    _trackers[id(ip)] = tracker
    ip.register_magics(FlorMagics(ip, tracker))
    ip.user_ns["flor"] = flor_nb
    # Exact vector math in this kernel from now on, so the cells a replay re-runs compute here as they will there
    cpu_math.settle()
    from flor_nb.executor import prestart

    try:
        prestart()  # replay workers fork from a server that has torch imported already
    except Exception as e:  # noqa: BLE001 - a warm start is an optimisation; replay starts workers itself
        warnings.warn(f"flor_nb: could not start replay workers ahead of time ({e}); the first replay will.",
                      stacklevel=2)


def unload_ipython_extension(ip):
    tracker = _trackers.pop(id(ip), None)
    if tracker is not None:
        tracker.unregister()
