"""flor_nb: hindsight logging for PyTorch training in notebooks.

Record a training cell, then later add log statements (probes) and replay only
the epochs you need from checkpoints, with a check that the replay is faithful.
"""
from .api import checkpoints, dataframe, get_run, get_store, replays, runs
from .errors import FlorError
from .record import record
from .replay import replay
from .resume import resume
from .runtime import arg, log, loop
from .signing import trust

__version__ = "0.1.0"

__all__ = [
    "log", "arg", "loop", "record", "replay", "resume", "runs", "dataframe", "get_run", "checkpoints", "replays",
    "report", "ui", "get_store", "trust", "FlorError",
]


def report(run, path=None, html=False, store=None):
    """Write a standalone notebook report of ``run`` (and HTML with ``html=True``); return its path."""
    from .reporting import report as _report

    return _report(run, path=path, html=html, store=store)


def ui(run=None):
    """Show the replay panel for ``run`` (default: the latest run). Needs ipywidgets."""
    import importlib

    return importlib.import_module("flor_nb.widgets").ui(run)


def load_ipython_extension(ip):
    """``%load_ext flor_nb``: registers the %%flor magics (entry point; the shell lives in extension/)."""
    import importlib

    importlib.import_module("flor_nb.extension").load_ipython_extension(ip)


def unload_ipython_extension(ip):
    import importlib

    importlib.import_module("flor_nb.extension").unload_ipython_extension(ip)
