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

import functools
import json
import logging
import os
import warnings
from array import array
import platform
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import disk, runtime, signing
from .errors import DamagedValueWarning, DiskFullError, StoreError, UnknownRunError
from .machine import alive
from .schema import MIGRATE, SCHEMA, SCHEMA_VERSION, packable, row_crc, series_crc

logger = logging.getLogger(__name__)

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


def _guard(fn):
    """Database errors become StoreError (DiskFullError for a full disk) naming the store and the fix."""
    @functools.wraps(fn)
    def guarded(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except sqlite3.Error as e:
            raise self._error(e, fn.__name__) from e
    return guarded


class Store:
    """A store folder. Safe to open from several processes (SQLite WAL)."""

    def __init__(self, home: str | os.PathLike | None = None):
        self.home = Path(home) if home else default_home()
        self.db_path = self.home / "flor.db"
        self._local = threading.local()
        _make_home(self.home)
        self._open()
        disk.clean_temp(self.home)
        disk.keep_reserve(self.home)

    @_guard
    def _open(self):
        found = self._schema()
        if found is None:  # a new store (only then is anything written on opening)
            self.db.executescript(SCHEMA)
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            found = self._schema()
        if found in MIGRATE:
            with self._tx() as db:
                found = self._schema()  # another process may have migrated it meanwhile
                for statement in MIGRATE.get(found, ()):
                    db.execute(statement)
                db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
            found = SCHEMA_VERSION
        if found != SCHEMA_VERSION:
            raise StoreError(f"The store {self.home} has schema {found}; this flor_nb uses {SCHEMA_VERSION}. "
                             "Use another store (FLOR_NB_HOME) or the flor_nb version that wrote it.")

    def _schema(self) -> int | None:
        """The store's schema version, read without writing (a full disk must not stop reading)."""
        has_meta = self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() if has_meta else None
        return int(row[0]) if row else None

    def _error(self, e: sqlite3.Error, where: str) -> StoreError:
        text = f"{type(e).__name__}: {e}"
        if "malformed" in str(e) or "not a database" in str(e) or isinstance(e, sqlite3.DatabaseError) and \
                not isinstance(e, sqlite3.OperationalError):
            return StoreError(f"The store database {self.db_path} is damaged ({text}). Its runs and logs cannot be "
                              f"read reliably. Move {self.home} aside and restore it from a backup (or try "
                              f"`sqlite3 {self.db_path} .recover`); record again into a new store.")
        if disk.is_full(e) or disk.free_bytes(self.home) == 0:
            return DiskFullError(f"flor_nb could not write to the store: {disk.full_message(self.home, text)}. "
                                 "Free space on that disk, then try again.", disk.free_bytes(self.home))
        if "locked" in str(e) or "busy" in str(e):
            return StoreError(f"The store database {self.db_path} stayed locked by another process for 30 s "
                              f"({text}). Wait for that record or replay to finish, or use another store.")
        doing = where.strip("_").replace("_", " ")
        return StoreError(f"The store {self.home} failed ({text}) in {doing}. Check that the folder is writable and "
                          "not on a full or failing disk, or use another store (--store PATH or FLOR_NB_HOME).")

    # -- connection ------------------------------------------------------------
    @property
    def db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("SELECT 1 FROM sqlite_master LIMIT 1")
            except sqlite3.OperationalError:
                conn = self._read_only() or conn  # no room for its WAL index (a full disk): still readable
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    def _read_only(self) -> sqlite3.Connection | None:
        """A connection that reads without creating anything (a full disk, a read-only folder)."""
        from urllib.parse import quote

        # mode=ro uses the WAL of a writer still running; immutable=1 needs none (a closed store has none)
        for flags in ("mode=ro", "immutable=1"):
            try:
                conn = sqlite3.connect(f"file:{quote(str(self.db_path))}?{flags}", uri=True, isolation_level=None)
                conn.execute("SELECT 1 FROM sqlite_master LIMIT 1")
            except sqlite3.Error:
                continue
            logger.warning("flor_nb: opened %s read-only (%s): %s", self.db_path, flags,
                           disk.full_message(self.home, "nothing can be written") if disk.free_bytes(self.home) == 0
                           else "the folder cannot be written")
            return conn
        return None

    def _tx(self):
        return _Transaction(self.db)

    def close(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

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

    # -- logs ------------------------------------------------------------------
    # Values logged at every step are the bulk of a run (a loss per step): a (name, epoch)
    # with many numeric step values is stored as one packed row of arrays in ``series``;
    # everything else one row per value in ``logs``. ``logs()`` returns both, row by row.
    def _insert(self, db, run_id, rows, kind, replay_id):
        groups: dict = {}
        for n, e, s, q, v in rows:
            g = groups.get((n, e))
            if g is None:
                g = groups[(n, e)] = ([], [], [])
            g[0].append(s)
            g[1].append(q)
            g[2].append(v)
        self._insert_groups(db, run_id, [(n, e, *g) for (n, e), g in groups.items()], kind, replay_id)

    def _insert_groups(self, db, run_id, groups, kind, replay_id, per_unit=()):
        """``per_unit``: (name, epochs, values) of values logged once per unit outside any step (an iteration
        loop's loss): one packed row per name, typecode ``Ed``/``Eq`` (its ``steps`` blob holds the units)."""
        plain, packed = [], []
        for n, epochs, vals in per_unit:
            code = "q" if all(type(v) is int for v in vals) else "d"
            row = (run_id, n, None, kind, replay_id, "E" + code, array("q", epochs).tobytes(),
                   bytes(8 * len(epochs)), array(code, vals).tobytes())
            packed.append((*row, series_crc(*row)))
        for n, e, steps, seqs, vals in groups:
            types = set(map(type, vals))
            if packable(steps, vals, types):
                code = "q" if types == {int} else "d"
                row = (run_id, n, e, kind, replay_id, code, array("q", steps).tobytes(),
                       array("q", seqs).tobytes(), array(code, vals).tobytes())
                packed.append((*row, series_crc(*row)))
            else:
                plain.extend((run_id, n, e, s, q, v, kind, replay_id, row_crc(run_id, n, e, s, q, v, kind, replay_id))
                             for s, q, v in zip(steps, seqs, vals))
        db.executemany("INSERT INTO logs (run_id, name, epoch, step, seq, value, kind, replay_id, crc) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", plain)
        db.executemany("INSERT INTO series (run_id, name, epoch, kind, replay_id, typecode, steps, seqs, vals, crc) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", packed)

    @_guard
    def add_logs(self, run_id: int, rows, kind: str = "recorded", replay_id: int | None = None):
        """rows: iterable of (name, epoch, step, seq, value as runtime.encode gives it)."""
        rows = list(rows)
        if rows:
            with self._tx() as db:
                self._insert(db, run_id, rows, kind, replay_id)

    @_guard
    def add_log_groups(self, run_id: int, groups, kind: str = "recorded", per_unit=()):
        """groups: (name, epoch, steps, seqs, values) with equal-length lists; the fast path for a recorder.
        ``per_unit``: see :meth:`_insert_groups`."""
        if groups or per_unit:
            with self._tx() as db:
                self._insert_groups(db, run_id, groups, kind, None, per_unit)

    @_guard
    def commit_epoch(self, run_id: int, groups, digests=(), completed: int | None = None, replace=(),
                     per_unit=()):
        """One transaction: log groups, state digests ``(epoch, kind, json)`` and the count of completed
        epochs, so a process killed at any moment leaves an epoch either wholly stored or not at all.
        ``replace``: epochs whose recorded rows these replace (a resumed run re-running them)."""
        with self._tx() as db:
            for epoch in replace:
                for table in ("logs", "series"):
                    db.execute(f"DELETE FROM {table} WHERE run_id=? AND kind='recorded' AND epoch=?", (run_id, epoch))
            self._insert_groups(db, run_id, groups, "recorded", None, per_unit)
            db.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)",
                           [(run_id, e, k, d) for e, k, d in digests])
            if completed is not None:
                db.execute("UPDATE runs SET epochs_completed=MAX(epochs_completed, ?) WHERE id=?", (completed, run_id))

    @_guard
    def replace_hindsight(self, run_id: int, names, epochs, rows, replay_id: int):
        """Store hindsight values, replacing earlier ones for the same names and epochs."""
        with self._tx() as db:
            for table in ("logs", "series"):
                for name in names:
                    for epoch in epochs:
                        db.execute(
                            f"DELETE FROM {table} WHERE run_id=? AND kind='hindsight' AND name=? AND epoch IS ?",
                            (run_id, name, epoch),
                        )
            self._insert(db, run_id, list(rows), "hindsight", replay_id)

    @_guard
    def logs(self, run_ids=None, names=None, kind=None) -> list[dict]:
        """Log rows (run_id, name, epoch, step, seq, value, kind, replay_id), in epoch and step order.

        Rows that fail their checksum are left out and reported (:class:`DamagedValueWarning`)."""
        where, params = "WHERE 1=1", []
        if run_ids is not None:
            run_ids = list(run_ids)
            where += f" AND run_id IN ({', '.join('?' * len(run_ids))})"
            params += run_ids
        if names:
            where += f" AND name IN ({', '.join('?' * len(names))})"
            params += list(names)
        if kind:
            where += " AND kind=?"
            params.append(kind)
        out, damaged = [], []
        for r in self.db.execute(f"SELECT * FROM logs {where}", params):
            d = dict(r)
            crc = d.pop("crc", None)
            if crc is not None and crc != row_crc(d["run_id"], d["name"], d["epoch"], d["step"], d["seq"],
                                                   d["value"], d["kind"], d["replay_id"]):
                damaged.append(d)
                continue
            out.append(d)
        for r in self.db.execute(f"SELECT * FROM series {where}", params):
            base = {"run_id": r["run_id"], "name": r["name"], "epoch": r["epoch"], "kind": r["kind"],
                    "replay_id": r["replay_id"]}
            crc = r["crc"]
            if crc is not None and crc != series_crc(r["run_id"], r["name"], r["epoch"], r["kind"], r["replay_id"],
                                                      r["typecode"], r["steps"], r["seqs"], r["vals"]):
                damaged.append({**base, "step": "all steps", "seq": None, "value": None})
                continue
            try:
                code = r["typecode"]
                steps, seqs, vals = (array("q", r["steps"]), array("q", r["seqs"]), array(code[-1], r["vals"]))
            except (ValueError, TypeError):
                damaged.append({**base, "step": "all steps", "seq": None, "value": None})
                continue
            if code.startswith("E"):  # one value per unit: the blob holds the units (epochs, iterations)
                out.extend({**base, "epoch": e, "step": None, "seq": 0, "value": v} for e, v in zip(steps, vals))
            else:
                out.extend({**base, "step": s, "seq": q, "value": v} for s, q, v in zip(steps, seqs, vals))
        if damaged:
            self._report_damaged(damaged)
        out.sort(key=_log_order)
        return out

    def _report_damaged(self, rows):
        labels = {r["id"]: f"{r['name']}@{r['version']}"
                  for r in self.db.execute("SELECT id, name, version FROM runs")}
        listed = "; ".join(f"{r['name']} of {labels.get(r['run_id'], r['run_id'])} epoch {r['epoch']} step "
                           f"{r['step']}" + (f" ({r['kind']})" if r["kind"] != "recorded" else "") for r in rows[:5])
        more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
        warnings.warn(f"flor_nb: {len(rows)} stored value(s) in {self.db_path} failed their checksum and are left "
                      f"out: {listed}{more}. The database was damaged on disk; restore it from a backup, or replay "
                      "the epochs to recompute them.", DamagedValueWarning, stacklevel=3)

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

    # -- replays ---------------------------------------------------------------
    @_guard
    def create_replay(self, run_id, code, cells, epochs, plan) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO replays (run_id, code, cells, epochs, started, status, plan, owner) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, code, json.dumps(cells), json.dumps(epochs), time.time(), "running", json.dumps(plan),
                 f"{platform.node()}:{os.getpid()}"),
            )
            return cur.lastrowid

    @_guard
    def set_replay_plan(self, replay_id, plan):
        with self._tx() as db:
            db.execute("UPDATE replays SET plan=? WHERE id=?", (json.dumps(plan), replay_id))

    @_guard
    def finish_replay(self, replay_id, status, duration, probes, fidelity):
        with self._tx() as db:
            db.execute(
                "UPDATE replays SET status=?, duration=?, probes=?, fidelity=? WHERE id=?",
                (status, duration, json.dumps(probes), json.dumps(fidelity), replay_id),
            )

    @_guard
    def replays(self, run_id) -> list[dict]:
        """A run's replays; one left 'running' by a process that died is marked 'interrupted'."""
        rows = self.db.execute("SELECT * FROM replays WHERE run_id=? ORDER BY id", (run_id,)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            for key in ("cells", "epochs", "probes", "fidelity", "plan"):
                d[key] = json.loads(d[key])
            host, _, pid = (d.get("owner") or "").rpartition(":")
            if d["status"] == "running" and host == platform.node() and pid.isdigit() and not alive(int(pid)):
                d["status"] = "interrupted"
                d["fidelity"] = {"error": "the process running the replay died"}
                try:
                    self.finish_replay(d["id"], d["status"], d["duration"], d["probes"], d["fidelity"])
                except StoreError:
                    pass
            out.append(d)
        return out


    # -- values, probes, housekeeping -------------------------------------------
    def decode(self, text):
        """A stored log value as Python: a number, a JSON value, or an array artifact loaded from disk.

        An array whose file fails its content hash is reported and given as None, never returned."""
        value = runtime.from_json(text)
        if isinstance(value, dict) and "__array__" in value:
            from .state import content_hash

            try:
                path = disk.inside(self.home, value["__array__"])
                if not path.exists():
                    return value
                array_ = np.load(path, allow_pickle=False)
                if value.get("hash") in (None, content_hash(array_)):
                    return array_
                why = "its content hash does not match"
            except (OSError, ValueError, StoreError) as e:
                why = f"it does not load ({type(e).__name__}: {e})"
            warnings.warn(f"flor_nb: the logged array {value['__array__']} is damaged ({why}); it is left out. "
                          "Replay its epoch to recompute it.", DamagedValueWarning, stacklevel=2)
            return None
        return value

    def probes_path(self, run: Run) -> Path:
        return self.home / "probes" / f"{run.name}@{run.version}.json"

    def save_probes(self, run: Run, probes: list[dict]) -> Path:
        """Remember a run's probes (``probes/NAME@VERSION.json``, written atomically)."""
        path = self.probes_path(run)
        disk.write_atomic(path, json.dumps({"run": run.label, "probes": list(probes)}, indent=1).encode())
        return path

    def load_probes(self, run: Run) -> list[dict] | None:
        """The probes remembered for ``run`` as dicts; None if none were ever saved for it."""
        path = self.probes_path(run)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return []
        return list(data.get("probes", []))

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


class _Transaction:
    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, *_):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")



def _make_home(home: Path):
    """Create the store folder private to the user, or say why this path cannot be a store."""
    if home.exists() and not home.is_dir():
        raise StoreError(f"The store path {home} is a file, not a folder. Give a folder (--store PATH or "
                         "FLOR_NB_HOME); flor_nb creates it if it does not exist.")
    try:
        disk.make_dir(home)
        db = home / "flor.db"
        if not db.exists():  # SQLite gives its WAL files the database's permissions: make it 0600 first
            try:
                os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
    except OSError as e:
        raise StoreError(f"Cannot use {home} as a flor_nb store: {e.strerror or e}. Give a folder you can write to "
                         "(--store PATH or FLOR_NB_HOME).") from e


def _log_order(r):
    e, s = r["epoch"], r["step"]
    return (r["run_id"], e is not None, e or 0, s is not None, s or 0, r["seq"])


def _to_run(row) -> Run:
    d = dict(row)
    for key in _JSON_COLS:
        d[key] = json.loads(d[key]) if d[key] else ({} if key != "deps" else [])
    return Run(**d)


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
