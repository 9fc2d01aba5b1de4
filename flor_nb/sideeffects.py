"""Files the replayed code writes: a replay re-runs user code, side effects included.

An early-stopping helper that ``torch.save``s the best model, a ``np.save`` of
predictions: re-running an epoch writes those files again, with what the replay
computed. flor_nb cannot undo that, but it must not happen silently. Two nets:
an audit hook (PEP 578) notes every file Python opens for writing while replayed
code runs, and a scan of the working directory (two levels, a few thousand
entries) before and after catches writes that bypass Python's ``open``
(``torch.save`` writes through C++). The verdict lists them.
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


_SCAN_LIMIT = 5000


def _scan(root: str, ignore: tuple, depth: int = 2) -> dict:
    """{path: (mtime_ns, size)} of files under ``root``, ``depth`` levels deep, at most a few thousand."""
    out: dict = {}
    stack = [(root, 0)]
    while stack and len(out) < _SCAN_LIMIT:
        folder, level = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            p = e.path
            if any(p.startswith(i) for i in ignore) or e.name in ("__pycache__", ".git", ".ipynb_checkpoints"):
                continue
            try:
                if e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    out[p] = (st.st_mtime_ns, st.st_size)
                elif e.is_dir(follow_symlinks=False) and level + 1 < depth:
                    stack.append((p, level + 1))
            except OSError:
                continue
    return out


class WriteWatch:
    """Context manager: ``files`` holds absolute paths written inside it (this thread's opens, and the cwd)."""

    def __init__(self, ignore=()):
        self.ignore = tuple(os.path.abspath(p) for p in ignore)
        self.files: set = set()
        self._before: dict = {}

    def __enter__(self):
        global _installed
        if not _installed:  # an audit hook cannot be removed: install once, activate per use
            sys.addaudithook(_hook)
            _installed = True
        self._before = _scan(os.getcwd(), self.ignore)
        _state.seen, _state.ignore = self.files, self.ignore
        return self

    def __exit__(self, *exc):
        _state.seen = None
        after = _scan(os.getcwd(), self.ignore)
        self.files.update(p for p, st in after.items() if self._before.get(p) != st)
        return False
