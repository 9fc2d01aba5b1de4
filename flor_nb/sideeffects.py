"""Files the replayed code writes: a replay re-runs user code, side effects included.

An early-stopping helper that ``torch.save``s the best model, a ``np.save`` of
predictions: re-running an epoch writes those files again, with what the replay
computed. flor_nb cannot undo that, but it must not happen silently: an audit
hook (PEP 578) notes every file Python opens for writing while replayed code
runs, and ``torch.save`` (which writes through C++, past Python's ``open``) is
watched too. The verdict lists them. Only this thread's writes count, so files
other processes touch meanwhile (a notebook's autosave) are not blamed on it.
"""
from __future__ import annotations

import os
import sys
import threading

_state = threading.local()
_installed = False
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _hook(event, args):
    if event != "open":
        return
    seen = getattr(_state, "seen", None)
    if seen is None:
        return
    path, mode, flags = (tuple(args) + (None, None, None))[:3]
    writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
        mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS)
    if writing and isinstance(path, (str, bytes, os.PathLike)):
        p = os.path.abspath(os.fsdecode(path))
        if not any(p.startswith(ignored) for ignored in _state.ignore):
            seen.add(p)


class WriteWatch:
    """Context manager: ``files`` holds absolute paths this thread wrote inside it."""

    def __init__(self, ignore=()):
        self.ignore = tuple(os.path.abspath(p) for p in ignore)
        self.files: set = set()
        self._saved = None

    def __enter__(self):
        global _installed
        if not _installed:  # an audit hook cannot be removed: install once, activate per use
            sys.addaudithook(_hook)
            _installed = True
        _state.seen, _state.ignore = self.files, self.ignore
        self._watch_torch_save()
        return self

    def _watch_torch_save(self):
        import torch
        import torch.serialization as ser

        original = ser.save

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, bytes, os.PathLike)):
                _hook("open", (f, "wb", None))
            return original(obj, f, *args, **kwargs)

        self._saved = original
        torch.save = ser.save = save

    def __exit__(self, *exc):
        _state.seen = None
        if self._saved is not None:
            import torch
            import torch.serialization as ser

            torch.save = ser.save = self._saved
        return False
