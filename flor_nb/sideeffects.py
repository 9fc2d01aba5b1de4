"""Files the replayed code writes: a replay re-runs user code, side effects included.

An early-stopping helper that ``torch.save``s the best model, a ``np.save`` of
predictions: re-running an epoch writes those files again, with what the replay
computed. flor_nb cannot undo that, but it must not happen silently: an audit
hook (PEP 578) notes every file Python opens for writing while replayed code
runs, and ``torch.save`` (which writes through C++, past Python's ``open``) is
watched too, as are files moved into place (a temporary file renamed: fsspec,
Lightning's checkpoints) and files removed. The verdict lists them. Only this thread's writes count, so files
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
    if event not in ("open", "os.rename", "os.remove", "os.rmdir"):
        return
    seen = getattr(_state, "seen", None)
    if seen is None:
        return
    if event == "os.rename":  # os.rename and os.replace: the destination now holds what was written
        _note(seen, args[1])
        return
    if event in ("os.remove", "os.rmdir"):  # os.remove, os.unlink, os.rmdir (shutil.rmtree: relative to a dir_fd)
        p = _user_path(_at(args[0], args[1] if len(args) > 1 else None))
        if p is not None and p not in seen:
            if event == "os.rmdir":  # the folder, not each file in it
                inside = p + os.sep
                _state.removed.difference_update({r for r in _state.removed if r.startswith(inside)})
                p = inside
            _state.removed.add(p)
        return
    path, mode, flags = (tuple(args) + (None, None, None))[:3]
    writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
        mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS)
    if writing:
        _note(seen, path)


def _at(path, dir_fd):
    """``path`` as an absolute one when it is relative to an open folder (``dir_fd``)."""
    if isinstance(dir_fd, int) and dir_fd >= 0 and isinstance(path, (str, bytes)) and not os.path.isabs(path):
        try:
            return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), os.fsdecode(path))
        except OSError:
            return path
    return path


def _user_path(path) -> str | None:
    if not isinstance(path, (str, bytes, os.PathLike)):
        return None
    p = os.path.abspath(os.fsdecode(path))
    return None if any(p.startswith(ignored) for ignored in _state.ignore) else p


def _note(seen, path):
    p = _user_path(path)
    if p is not None:
        seen.add(p)
        _state.removed.discard(p)


class WriteWatch:
    """Context manager: ``files`` holds absolute paths this thread wrote inside it, ``removed`` those it removed
    that were there before (a file it wrote and then removed is in neither)."""

    def __init__(self, ignore=()):
        self.ignore = tuple(os.path.abspath(p) for p in ignore)
        self.files: set = set()
        self.removed: set = set()
        self._saved = None

    def __enter__(self):
        global _installed
        if not _installed:  # an audit hook cannot be removed: install once, activate per use
            sys.addaudithook(_hook)
            _installed = True
        _state.seen, _state.ignore, _state.removed = self.files, self.ignore, self.removed
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
        self.files -= {p for p in self.files if not os.path.lexists(p)}  # written, then removed or moved away
        if self._saved is not None:
            import torch
            import torch.serialization as ser

            torch.save = ser.save = self._saved
        return False
