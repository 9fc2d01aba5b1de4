"""The replay panel for notebooks: ``flor.ui()`` / ``%flor ui``.

A thin layer of ipywidgets over the engine's public API: everything the panel
does can be done with :func:`flor_nb.start_replay` / :func:`flor_nb.replay`,
:mod:`flor_nb.probes`, :func:`flor_nb.dataframe`, :func:`flor_nb.delete` and
:func:`flor_nb.report`.
"""
from __future__ import annotations

from .panel import Panel

__all__ = ["Panel", "ui"]


def ui(run=None, store=None, executor=None) -> Panel:
    """The replay panel for ``run`` (``NAME`` or ``NAME@VERSION``; default: the latest run); its replays run on
    ``executor`` (as in :func:`flor_nb.replay`; default ``$FLOR_NB_EXECUTOR``, else this machine's workers)."""
    import flor_nb

    if run is not None:
        flor_nb.get_store(store).find_run(run)  # an unknown run raises here, naming the known ones
    return Panel(run=run, store=store, executor=executor)
