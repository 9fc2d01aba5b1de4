"""The store's disk: free space, a small reserve for full disks, files private to the user, temp files.

When the disk fills, checkpoints (big) stop first; log rows (small) must keep
being stored. A *reserve* file of a few MiB is kept in the store and deleted the
first time a write fails for lack of space, so the rows of the remaining epochs
and the run's final status still fit. Every file and folder flor_nb creates is
private to the user (0600 files, 0700 folders).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import re
import shutil
import sqlite3
import sys
import threading
import time
from pathlib import Path

from .machine import alive

logger = logging.getLogger(__name__)

RESERVE = ".reserve"
RESERVE_BYTES = int(float(os.environ.get("FLOR_NB_RESERVE_BYTES", 2 << 20)))
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_SQLITE_FULL = 13
_TMP = re.compile(r"^\..+\.(\d+)(?:-\d+)?\.tmp$")
# Bytes per write() call. On this project's VMs (ext4) one write() of 64 MB into the page cache cost 8-10 times
# the CPU of the same bytes in 1 MB calls (about 160 against 18 ms), and a 7 MB one up to 20 ms against 2.5 ms
# (bench/write_chunks.py; reads showed no such difference). That CPU, in the saver or the writer thread, is
# taken from training on a 2-core machine.
_WRITE_CHUNK = 1 << 20


def is_full(exc: BaseException) -> bool:
    """Was ``exc`` caused by a full disk (or quota)? Looks through ``__cause__`` chains."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if isinstance(exc, sqlite3.Error) and ((getattr(exc, "sqlite_errorcode", 0) & 0xFF) == _SQLITE_FULL
                                               or "disk is full" in str(exc)):
            return True
        if getattr(exc, "disk_full", False):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def free_bytes(path) -> int | None:
    """Free bytes on the file system holding ``path`` (None when it cannot be told)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def format_bytes(n: int | None) -> str:
    if n is None:
        return "unknown free space"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def full_message(home, what: str) -> str:
    """One sentence: the disk is full, where, how much is free, what could not be written."""
    return f"the disk holding {home} is full ({format_bytes(free_bytes(home))} free): {what}"


# -- private files -----------------------------------------------------------------------
def make_dir(path) -> Path:
    """Create ``path`` and its missing parents, each private to the user (``mkdir -p`` gives parents 0755)."""
    path = Path(path)
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
    return Path(missing[0]) if missing else path


def open_private(path, mode: str = "wb"):
    """Open a new file for writing, readable by the user only (whatever the umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    return open(fd, mode)


def write_out(f, data) -> None:
    """Write ``data`` to the open binary file ``f`` in calls of at most ``_WRITE_CHUNK`` bytes."""
    view = memoryview(data).cast("B")
    for start in range(0, len(view), _WRITE_CHUNK):
        f.write(view[start:start + _WRITE_CHUNK])


def _temp_name(path: Path) -> Path:
    """Where ``path`` is written before its rename: this process and thread's own (``_TMP`` finds it)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_native_id()}.tmp")


def write_atomic(path, data) -> None:
    """Write ``data`` to ``path`` through a temp file, fsynced and renamed; nothing is left on failure."""
    path = Path(path)
    make_dir(path.parent)
    tmp = _temp_name(path)
    try:
        with open_private(tmp) as f:
            write_out(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _reports_errors(release: str) -> bool:
    """Whether a Linux kernel of this release reports writeback errors from ``syncfs`` (5.8 and later)."""
    m = re.match(r"(\d+)\.(\d+)", release)
    return bool(m) and (int(m[1]), int(m[2])) >= (5, 8)


def _load_syncfs():
    """libc's ``syncfs`` (Linux): flush one filesystem's dirty data and metadata in one journal commit.
    None where it cannot tell a failed write (kernels before 5.8): then each file is fsynced."""
    if not sys.platform.startswith("linux") or not _reports_errors(os.uname().release):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    return fn


_SYNCFS = _load_syncfs()


def _flush_filesystem(folder) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs failed: {os.strerror(err)}", str(folder))
    finally:
        os.close(fd)


def write_all_atomic(items, home) -> None:
    """Write many new files of one store: each to a temp file, then one flush of the filesystem
    (``syncfs``) for all of them, then the renames and a second flush, instead of one fsync each.

    On this VM's disk 100 fsyncs of a checkpoint's blobs took 40-50 ms of the writer's time and slowed
    training on the other core by more than that. A file appears under its name only once its bytes are
    on disk, and the renames are on disk before this returns (the checkpoint file naming them is written
    after). Where ``syncfs`` is missing or cannot report a failed write (not Linux, Linux before 5.8),
    each file is written by :func:`write_atomic`.
    Nothing is left on failure."""
    items = list(items)
    if _SYNCFS is None or len(items) < 2:
        for path, data in items:
            write_atomic(path, data)
        return
    temps: list = []
    try:
        for path, data in items:
            path = Path(path)
            make_dir(path.parent)
            temps.append((_temp_name(path), path))
            with open_private(temps[-1][0]) as f:
                write_out(f, data)
        _flush_filesystem(home)
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:  # those renamed already are gone: nothing to unlink
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    _flush_filesystem(home)


# -- the reserve -------------------------------------------------------------------------
def keep_reserve(home) -> None:
    """Make sure the store holds its reserve (best effort: never an error)."""
    path = Path(home) / RESERVE
    if RESERVE_BYTES <= 0 or path.exists():
        return
    free = free_bytes(home)
    if free is not None and free < 4 * RESERVE_BYTES:
        return  # space is short already: keep it for the store itself
    tmp = path.with_name(f"{RESERVE}.{os.getpid()}.tmp")
    try:
        with open_private(tmp) as f:
            try:
                os.posix_fallocate(f.fileno(), 0, RESERVE_BYTES)  # real blocks, not a sparse file
            except (AttributeError, OSError):
                f.write(b"\0" * RESERVE_BYTES)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def release_reserve(home) -> bool:
    """Free the reserve so the rows of a run on a full disk still fit; True if there was one."""
    try:
        os.unlink(Path(home) / RESERVE)
    except OSError:
        return False
    logger.warning("flor_nb: the disk holding %s is full; released the store's %s reserve for log rows",
                   home, format_bytes(RESERVE_BYTES))
    return True


# -- temp files --------------------------------------------------------------------------
def clean_temp(home) -> int:
    """Remove temp files left by processes that died while writing (a SIGKILL mid-checkpoint)."""
    home = Path(home)
    removed = 0
    stack = [home]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            elif entry.name.endswith(".tmp") and _orphan(entry):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed += 1
    if removed:
        logger.info("flor_nb: removed %d temp file(s) left in %s by a process that died", removed, home)
    return removed


def _orphan(entry) -> bool:
    m = _TMP.match(entry.name) or re.match(rf"^{re.escape(RESERVE)}\.(\d+)\.tmp$", entry.name)
    if m:
        return not alive(int(m.group(1)))
    try:  # a temp file without a pid: left over if nobody touched it for 10 minutes
        return time.time() - entry.stat(follow_symlinks=False).st_mtime > 600
    except OSError:
        return False



def inside(home, rel) -> Path:
    """``home / rel``, refusing a path that leads out of the store (``..``, absolute, a symlink out)."""
    from .errors import StoreError

    home = Path(home)
    rel_path = Path(rel)
    path = home / rel_path
    bad = rel_path.is_absolute() or ".." in rel_path.parts or "\0" in str(rel)
    if not bad:
        try:
            path.resolve().relative_to(home.resolve())
        except ValueError:
            bad = True
    if bad:
        raise StoreError(f"The store {home} names the file {str(rel)!r}, which lies outside the store. flor_nb only "
                         "reads and writes inside the store; this store was built by hand or tampered with.")
    return path
