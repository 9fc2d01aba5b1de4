"""The run store: one SQLite database (WAL) plus a folder of checkpoint files.

Layout of a store folder (default ``.flor/`` in the working directory)::

    flor.db               runs, logs, checkpoints, replays
    checkpoints/<run>/    one file per epoch boundary (see checkpoint.py)
    blobs/                tensors and pickled values, by content hash
    artifacts/<run>/      arrays logged with flor.log
    .reserve              room kept for log rows when the disk fills (see disk.py)

The folder and its files are private to the user (0700, 0600). Every log value
carries a checksum (``crc``): a damaged value is reported and left out, never
returned. Database errors become :class:`~flor_nb.errors.StoreError` naming the
store and what to do.
"""
from __future__ import annotations

import json
import os
import platform
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import disk, signing
from .errors import StoreError, UnknownRunError
from .machine import alive
from .schema import packable  # noqa: F401 - importable from here as before (rows.py)
from .store_db import Database, _guard, _make_home
from .store_logs import LogRows
from .store_replays import ReplayRows

RECORDING: set = set()  # (database, run id) of the runs this process is recording now (record.py keeps it)


def default_home() -> Path:
    """The store folder: ``$FLOR_NB_HOME`` or ``./.flor``."""
    return Path(os.environ.get("FLOR_NB_HOME") or Path.cwd() / ".flor")


@dataclass
class Run:
    """One recorded run version, as stored."""

    id: int
    name: str
    version: int
    status: str
    started: float
    ended: float | None
    epochs_completed: int
    epochs_total: int | None
    code: str
    deps: list = field(default_factory=list)
    args: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    error: str | None = None
    sig: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def duration(self) -> float | None:
        return None if self.ended is None else self.ended - self.started


_JSON_COLS = ("deps", "args", "env", "state", "timings")


def _to_run(row) -> Run:
    d = dict(row)
    for key in _JSON_COLS:
        try:
            d[key] = json.loads(d[key]) if d[key] else ({} if key != "deps" else [])
        except ValueError as e:  # a page cut off the file reads as zeros: damage, named as SQLite names it
            raise sqlite3.DatabaseError("database disk image is malformed") from e
    return Run(**d)


class Store(Database, LogRows, ReplayRows):
    """A store folder. Safe to open from several processes (SQLite WAL).

    Connection and transactions: :mod:`~flor_nb.store_db`; log rows: :mod:`~flor_nb.store_logs`; replays and
    probes: :mod:`~flor_nb.store_replays`."""

    def __init__(self, home: str | os.PathLike | None = None):
        self.home = Path(home) if home else default_home()
        self.db_path = self.home / "flor.db"
        self._local = threading.local()
        _make_home(self.home)
        self._open()
        disk.clean_temp(self.home)
        disk.keep_reserve(self.home)

    # -- runs ------------------------------------------------------------------
    @_guard
    def create_run(self, name: str, code: str, **fields) -> Run:
        with self._tx() as db:
            row = db.execute("SELECT COALESCE(MAX(version), 0) FROM runs WHERE name=?", (name,)).fetchone()
            version = row[0] + 1
            cols = {"name": name, "version": version, "status": "running", "started": time.time(), "code": code,
                    "sig": signing.sign_run(name, version, code, fields.get("deps") or [])}
            for key, value in fields.items():
                cols[key] = json.dumps(value) if key in _JSON_COLS else value
            db.execute(
                f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                tuple(cols.values()),
            )
            row = db.execute("SELECT * FROM runs WHERE name=? AND version=?", (name, version)).fetchone()
        return _to_run(row)  # not reaped: its recorder registers it in RECORDING next

    @_guard
    def set_signature(self, run_id: int, sig: str):
        with self._tx() as db:
            db.execute("UPDATE runs SET sig=? WHERE id=?", (sig, run_id))

    @_guard
    def update_run(self, run_id: int, **fields):
        if not fields:
            return
        sets = ", ".join(f"{k}=?" for k in fields)
        values = [json.dumps(v) if k in _JSON_COLS else v for k, v in fields.items()]
        with self._tx() as db:
            db.execute(f"UPDATE runs SET {sets} WHERE id=?", (*values, run_id))

    @_guard
    def all_runs(self) -> list[Run]:
        rows = self.db.execute("SELECT * FROM runs ORDER BY started, id").fetchall()
        return [self._reap(_to_run(r)) for r in rows]

    @_guard
    def find_run(self, spec) -> Run:
        """Resolve ``NAME`` (latest version), ``NAME@VERSION`` or a Run."""
        if isinstance(spec, Run):
            spec = spec.label
        name, _, version = str(spec).partition("@")
        if version:
            if not version.isdigit():
                raise UnknownRunError(f"Bad run {spec!r}: write NAME or NAME@VERSION, e.g. digits@2.")
            row = self.db.execute("SELECT * FROM runs WHERE name=? AND version=?", (name, int(version))).fetchone()
        else:
            row = self.db.execute(
                "SELECT * FROM runs WHERE name=? ORDER BY version DESC LIMIT 1", (name,)
            ).fetchone()
        if row is None:
            known = sorted({f"{r.name}@{r.version}" for r in self.all_runs()})
            hint = ", ".join(known) if known else "none yet: record one with %%flor record --name NAME"
            raise UnknownRunError(f"No run {spec!r} in {self.home}. Known runs: {hint}.")
        return self._reap(_to_run(row))

    def _reap(self, run: Run) -> Run:
        """A run left 'running' by a process that died (a kernel crash), or by this process when it is not
        recording it any more (its final write failed on a full disk), is marked interrupted."""
        pid, host = run.env.get("pid"), run.env.get("host")
        if run.status != "running" or not pid or host != platform.node():
            return run
        if pid == os.getpid() and (str(self.db_path), run.id) in RECORDING or pid != os.getpid() and alive(pid):
            return run
        try:
            self.update_run(run.id, status="interrupted", error="the recording process died")
        except StoreError:  # a full or read-only disk: still say so to the reader
            pass
        run.status, run.error = "interrupted", "the recording process died"
        return run

    # -- checkpoints -----------------------------------------------------------
    @_guard
    def add_checkpoint(self, run_id, epoch, kind, path, nbytes, logical_bytes, checksum, digest,
                       end_digest=None, end_path=None):
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, epoch, kind, str(path), nbytes, logical_bytes, checksum, digest, end_digest, end_path,
                 time.time()),
            )

    @_guard
    def add_digest(self, run_id, epoch, kind, digest):
        self.add_digests(run_id, [(epoch, kind, digest)])

    @_guard
    def add_digests(self, run_id, digests):
        """digests: (epoch, 'step' | 'end', JSON) rows, in one transaction."""
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)",
                           [(run_id, e, k, d) for e, k, d in digests])

    @_guard
    def digests(self, run_id) -> dict[tuple[int, str], str]:
        """{(epoch, 'step' | 'end'): JSON digests} recorded where no checkpoint was taken."""
        rows = self.db.execute("SELECT epoch, kind, digest FROM digests WHERE run_id=?", (run_id,))
        return {(r["epoch"], r["kind"]): r["digest"] for r in rows}

    @_guard
    def checkpoints(self, run_id) -> dict[int, sqlite3.Row]:
        rows = self.db.execute("SELECT * FROM checkpoints WHERE run_id=? ORDER BY epoch", (run_id,))
        return {r["epoch"]: r for r in rows}

    def checkpoint_dir(self, run: Run) -> Path:
        return disk.inside(self.home, f"checkpoints/{run.name}@{run.version}")

    def artifact_dir(self, run_id: int) -> Path:
        return self.home / "artifacts" / str(int(run_id))

    # -- housekeeping ------------------------------------------------------------
    def signature(self) -> tuple:
        """Changes whenever a run is added, deleted or changes status: cheap to poll."""
        row = self.db.execute("SELECT COUNT(*), GROUP_CONCAT(id || ':' || status || ':' || epochs_completed) "
                              "FROM runs").fetchone()
        return tuple(row)

    def recording(self) -> list[Run]:
        """Runs being recorded right now by a live process (a crashed recorder's runs are reaped)."""
        return [r for r in self.all_runs() if r.status == "running"]

    @_guard
    def delete_run(self, run_id: int):
        """Remove a run's rows: logs, series, checkpoints, digests, replays and the run itself."""
        with self._tx() as db:
            for table in ("logs", "series", "checkpoints", "digests", "replays"):
                db.execute(f"DELETE FROM {table} WHERE run_id=?", (run_id,))
            db.execute("DELETE FROM runs WHERE id=?", (run_id,))


_STORES: dict = {}


def get_store(store=None) -> Store:
    """The Store for ``store`` (a Store, a path, or None for ``$FLOR_NB_HOME`` / ``./.flor``), opened once."""
    if isinstance(store, str) and "://" in store:  # a blob location (s3://...): the index is the default store
        store = None
    if isinstance(store, Store):
        return store
    home = str(store or default_home())
    if home not in _STORES:
        _STORES[home] = Store(home)
    return _STORES[home]
