"""What a store holds on disk: each run's size, deleting runs, collecting blobs nothing refers to, trusting a store.

Checkpoints share content-addressed blobs (a frozen backbone is stored once for
every run that has it), so a run's *size* counts every blob it refers to, and
what deleting it *frees* counts only the blobs no other run refers to. Blobs
are removed only when no remaining checkpoint file refers to them, and never
while a run is being recorded: a recorder writes (or reuses) blobs before the
checkpoint file that names them exists.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import checkpoint, disk, signing
from .errors import FlorError
from .store import Run, Store, get_store

log = logging.getLogger(__name__)

_REFS: dict = {}  # (path, mtime_ns, size) -> blobs it refers to: checkpoint files never change in place


class RecordingInProgressError(FlorError):
    """The store is being written by a live recording; deleting or collecting now could break it."""


@dataclass
class RunUsage:
    """Disk use of one run: its own files, and the blobs its checkpoints refer to."""

    run: Run
    files: int = 0  # checkpoint files, arrays logged with flor.log, remembered probes
    blobs: set = field(default_factory=set)
    size: int = 0  # files + every blob referred to
    unique: int = 0  # files + blobs no other run refers to: what deleting the run frees
    unreadable: list = field(default_factory=list)  # checkpoint files whose references could not be read


@dataclass
class Usage:
    """Disk use of a whole store (see :func:`usage`)."""

    home: Path
    runs: list[RunUsage]
    blob_bytes: int  # every blob on disk
    unreferenced: int  # blobs no checkpoint refers to: what flor.gc() frees
    database: int
    total: int  # everything under the store folder
    reserve: int = 0  # the file kept so log rows still fit when the disk fills (see disk.py)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _tree_size(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return _size(path)
    return sum(_size(p) for p in path.rglob("*") if p.is_file())


def _checkpoint_files(st: Store, run: Run) -> list[str]:
    if run.env.get("blobs"):  # its checkpoints are elsewhere (a shared folder, s3://): not this folder's to count
        return []
    rows = st.checkpoints(run.id).values()
    return [p for r in rows for p in (r["path"], r["end_path"]) if p]


def references(st: Store, rel: str) -> set[str]:
    """Blobs checkpoint file ``rel`` refers to (cached while the file is unchanged)."""
    path = st.home / rel
    stat = path.stat()  # FileNotFoundError for a missing file: the caller decides
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _REFS:
        _REFS[key] = checkpoint.references(st.home, rel)
    return _REFS[key]


def _run_files(st: Store, run: Run) -> list[Path]:
    """Files and folders that belong to ``run`` alone."""
    return [st.checkpoint_dir(run), st.artifact_dir(run.id), st.home / "artifacts" / f"{run.id}-h",
            st.probes_path(run)]


def _blob_sizes(st: Store) -> dict[str, int]:
    root = st.home / "blobs"
    if not root.exists():
        return {}
    return {p.name: _size(p) for p in root.glob("*/*") if p.is_file() and not p.name.startswith(".")}


def usage(store=None) -> Usage:
    """Per run: size on disk and what deleting it frees; for the store: blobs, unreferenced bytes, total."""
    st = get_store(store)
    sizes = _blob_sizes(st)
    runs = []
    for r in st.all_runs():
        u = RunUsage(r)
        u.files = sum(_tree_size(p) for p in _run_files(st, r))
        for rel in _checkpoint_files(st, r):
            try:
                u.blobs |= references(st, rel)
            except (OSError, FlorError, RuntimeError, ValueError) as e:
                u.unreadable.append(f"{rel} ({type(e).__name__})")
        runs.append(u)
    count: dict = {}
    for u in runs:
        for h in u.blobs:
            count[h] = count.get(h, 0) + 1
    for u in runs:
        u.size = u.files + sum(sizes.get(h, 0) for h in u.blobs)
        u.unique = u.files + sum(sizes.get(h, 0) for h in u.blobs if count[h] == 1)
    referenced = set(count)
    database = sum(_size(st.home / n) for n in ("flor.db", "flor.db-wal", "flor.db-shm"))
    return Usage(st.home, runs, sum(sizes.values()), sum(s for h, s in sizes.items() if h not in referenced),
                 database, _tree_size(st.home), _size(st.home / disk.RESERVE))


def _live_recordings(st: Store, except_ids=()) -> list[Run]:
    return [r for r in st.recording() if r.id not in set(except_ids)]


def _select(st: Store, specs) -> list[Run]:
    """``NAME@VERSION`` is that version; a bare ``NAME`` is every version of it."""
    chosen: dict = {}
    for spec in specs:
        if isinstance(spec, Run):
            spec = spec.label
        if "@" in str(spec):
            r = st.find_run(spec)
            chosen[r.id] = r
        else:
            st.find_run(spec)  # an unknown name raises, listing the known runs
            chosen.update({r.id: r for r in st.all_runs() if r.name == str(spec)})
    return sorted(chosen.values(), key=lambda r: (r.name, r.version))


@dataclass
class Freed:
    """What :func:`delete` or :func:`gc` removed."""

    runs: list[str]
    bytes: int
    blobs: int
    note: str = ""

    def __str__(self):
        what = f"deleted {', '.join(self.runs)}; " if self.runs else ""
        blobs = f" ({self.blobs} unreferenced blob{'s' if self.blobs != 1 else ''})" if self.blobs else ""
        return f"flor_nb: {what}freed {format_bytes(self.bytes)}{blobs}." + (f" {self.note}" if self.note else "")


def delete(*runs, store=None) -> Freed:
    """Delete runs (``NAME@VERSION``, or ``NAME`` for every version) with their checkpoints, logs, replays
    and probes, then the blobs no remaining checkpoint refers to. Asks nothing; returns what was freed."""
    st = get_store(store)
    if not runs:
        raise FlorError("Name the runs to delete, e.g. flor.delete('digits@2') (or 'digits' for every version).")
    chosen = _select(st, runs)
    busy = [r.label for r in chosen if r.status == "running"]
    if busy:
        raise RecordingInProgressError(
            f"{', '.join(busy)} {'is' if len(busy) == 1 else 'are'} being recorded right now (its process is alive). "
            "Wait for the recording to end, or interrupt it, then delete.")
    removed = 0
    for r in chosen:
        st.delete_run(r.id)
        removed += sum(_remove(path) for path in _run_files(st, r))
        log.info("flor_nb: deleted %s", r.label)
    freed = gc(st)
    return Freed([r.label for r in chosen], removed + freed.bytes, freed.blobs, freed.note)


def gc(store=None) -> Freed:
    """Remove blobs no checkpoint refers to, and files left by deleted runs. Safe to run any time:
    it keeps every blob while a recording is in progress or a checkpoint file cannot be read."""
    st = get_store(store)
    freed = _remove_orphans(st)
    live = _live_recordings(st)
    note = ""
    removed = 0
    if live:
        note = (f"Blobs were not collected: {', '.join(r.label for r in live)} is being recorded. "
                "Run flor.gc() after it ends.")
    else:
        referenced, unreadable = set(), []
        for r in st.all_runs():
            for rel in _checkpoint_files(st, r):
                try:
                    referenced |= references(st, rel)
                except FileNotFoundError:
                    continue  # a missing file refers to nothing that can still be loaded
                except (OSError, FlorError, RuntimeError, ValueError):
                    unreadable.append(rel)
        if unreadable:
            note = (f"Blobs were not collected: checkpoint file{'s' if len(unreadable) > 1 else ''} "
                    f"{', '.join(unreadable[:3])} could not be read, so which blobs they need is unknown.")
        elif _live_recordings(st):  # one started while references were read: leave the blobs alone
            note = "Blobs were not collected: a recording started meanwhile. Run flor.gc() after it ends."
        else:
            for h in set(_blob_sizes(st)) - referenced:
                freed += _remove(checkpoint.blob_path(st.home, h))
                removed += 1
    return Freed([], freed, removed, note)


def _remove_orphans(st: Store) -> int:
    """Files of runs that are no longer in the database (deleted, or a crash between steps); bytes freed."""
    runs = st.all_runs()
    labels = {r.label for r in runs}
    ids = {str(r.id) for r in runs}
    freed = 0
    for path in (st.home / "checkpoints").glob("*"):
        if path.is_dir() and path.name not in labels:
            freed += _remove(path)
    for path in (st.home / "artifacts").glob("*"):
        if path.name.removesuffix("-h") not in ids:
            freed += _remove(path)
    for path in (st.home / "probes").glob("*.json"):
        if path.stem not in labels:
            freed += _remove(path)
    old = time.time() - 3600  # temp files of writes that died half-way, long ago
    for path in (st.home / "blobs").glob("*/.*.tmp"):
        if _mtime(path) < old:
            freed += _remove(path)
    return freed


# -- trusting a store ---------------------------------------------------------------------
def trust(store=None) -> dict:
    """Vouch for a store: re-sign its recorded cells and checkpoints with your key.

    Only do this for a store whose origin you trust: afterwards replay runs its code. Damaged
    checkpoint files are not signed (replay routes around them). Returns what was signed.
    """
    st = get_store(store)
    runs = st.all_runs()
    for run in runs:
        st.set_signature(run.id, signing.sign_run(run.name, run.version, run.code, run.deps))
    signed, damaged = 0, {}
    for path in sorted(st.home.rglob("*.ckpt")):
        rel = path.relative_to(st.home).as_posix()
        try:
            checkpoint.resign(st.home, rel)
            signed += 1
        except checkpoint.CorruptCheckpointError as e:
            damaged[rel] = str(e)
    log.warning("flor_nb: trusted %s: signed %d run(s) and %d checkpoint file(s)%s", st.home, len(runs), signed,
                   f"; {len(damaged)} damaged file(s) left unsigned" if damaged else "")
    return {"store": str(st.home), "runs": len(runs), "checkpoints": signed, "damaged": damaged}


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def _remove(path: Path) -> int:
    """Remove a file or folder; the bytes it held."""
    size = _tree_size(path)
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            os.unlink(path)
    except FileNotFoundError:
        return 0
    return size


def format_bytes(n: float) -> str:
    """1.2 MB, 340 kB, 12 B (decimal units, as disk tools print them)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
