"""Pieces every part of the panel uses: callbacks that report their errors, and muting them."""
from __future__ import annotations

import contextlib
import functools

import ipywidgets as W

NBSP = "\u00a0"  # option labels collapse plain spaces; code indentation needs these


def layout(**kw) -> W.Layout:
    return W.Layout(**kw)


class Callbacks:
    """Mixin for a widget with ``@guarded`` callbacks; the class provides ``_fail(exc, context)``."""

    _muted = 0

    @contextlib.contextmanager
    def quiet(self):
        """Set widget values without running the callbacks they would trigger."""
        self._muted += 1
        try:
            yield
        finally:
            self._muted -= 1


def guarded(fn):
    """A widget callback whose errors show in the panel (status line and error box), never lost.

    Muted while ``self.quiet()``. The docstring's first line names the action in the error.
    """
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if self._muted:
            return None
        try:
            return fn(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - shown to the user, not swallowed
            self._fail(e, (fn.__doc__ or "").splitlines()[0].rstrip("."))
            return None
    return wrapper
