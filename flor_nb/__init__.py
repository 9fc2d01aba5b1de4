"""flor_nb: hindsight logging for PyTorch training in notebooks.

Record a training cell, then later add log statements (probes) and replay only
the epochs you need from checkpoints, with a check that the replay is faithful.
"""
from .api import checkpoints, dataframe, du, get_run, get_store, replays, runs
from .background import start_replay
from .devices import deterministic
from .housekeeping import delete, gc, trust
from .errors import FlorError
from .record import record
from .replay import replay
from .resume import resume
from .runtime import While, arg, fit, log, loop  # While, fit: for instrumented cells
from .runtime import carry as _carry  # for an instrumented helper

__version__ = "0.1.0"

__all__ = [
    "log", "arg", "loop", "record", "replay", "resume", "start_replay", "runs", "dataframe", "get_run",
    "checkpoints", "replays", "report", "ui", "get_store", "delete", "gc", "du", "trust", "FlorError",
    "deterministic",
]


def report(run, path=None, html=False, store=None, all_versions=False):
    """Write a standalone notebook report of ``run`` (and HTML with ``html=True``) to ``flor_reports/``;
    return its path. See :func:`flor_nb.reporting.report`."""
    from . import reporting  # nbformat and nbconvert take ~2 s to import: only when a report is asked for

    return reporting.report(run, path=path, html=html, store=store, all_versions=all_versions)


def ui(run=None, store=None, executor=None):
    """Show the replay panel for ``run`` (default: the latest run). Needs ipywidgets. ``executor``: where its
    replays run, as in :func:`replay` (a Dask client or ``"dask://host:port"``; the panel can change it)."""
    import importlib  # the engine imports no UI: the panel's module is loaded only when asked for

    return importlib.import_module("flor_nb.widgets").ui(run, store=store, executor=executor)


def load_ipython_extension(ip):
    """``%load_ext flor_nb``: registers the %%flor magics (entry point; the shell lives in extension/)."""
    import importlib

    importlib.import_module("flor_nb.extension").load_ipython_extension(ip)


def unload_ipython_extension(ip):
    import importlib

    importlib.import_module("flor_nb.extension").unload_ipython_extension(ip)
