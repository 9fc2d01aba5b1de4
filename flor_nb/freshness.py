"""Warm replay workers import a user's module again once its source file changed.

A warm worker keeps what it imported, so a replay after editing ``mymodel.py``
would run the old code. Modules loaded from outside the standard library and
site-packages (the user's own files) are remembered with their file's mtime and
size when first seen; before each task, any whose file changed is dropped from
``sys.modules``, so the recorded cells' ``import`` reads the file again.
"""
from __future__ import annotations

import importlib
import os
import sys
import sysconfig
from pathlib import Path

_seen: dict = {}  # module name -> (file, (mtime_ns, size)) when it was first seen
_UNKNOWN = ("changed while it was being imported",)  # never equal to a stamp: imported again next time
_OURS = str(Path(__file__).resolve().parent)


def _system_dirs() -> tuple:
    dirs = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    dirs |= {sys.prefix, sys.base_prefix, sys.exec_prefix, _OURS}
    return tuple(os.path.realpath(d) + os.sep for d in dirs if d)


_SYSTEM = _system_dirs()


_where: dict = {}  # module name -> its real file when it is a user module, else None (decided once)


def _user_modules():
    for name, mod in list(sys.modules.items()):
        if name not in _where:
            f = getattr(mod, "__file__", None)
            real = os.path.realpath(f) if f and os.path.isabs(f) and name != "__main__" else None
            _where[name] = None if real is None or real.startswith(_SYSTEM) else real
        if _where[name] is not None:
            yield name, _where[name]


def _stamp(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def remember(since_ns: int | None = None) -> None:
    """Note the files of user modules imported since the last call.

    ``since_ns``: when the task that imported them began; a file changed after that may have been
    edited after the import, so it is noted as unknown and imported again before the next task.
    """
    for name, path in _user_modules():
        if name not in _seen:
            stamp = _stamp(path)
            edited = stamp is not None and since_ns is not None and stamp[0] > since_ns
            _seen[name] = (path, _UNKNOWN if edited else stamp)


def evict_stale() -> list[str]:
    """Drop user modules whose file changed since they were imported; returns their names."""
    stale = [name for name, path in _user_modules() if name in _seen and _seen[name] != (path, _stamp(path))]
    for name in stale:
        sys.modules.pop(name, None)
        _seen.pop(name, None)
        _where.pop(name, None)
    if stale:
        importlib.invalidate_caches()
    return stale
