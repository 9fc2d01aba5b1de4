"""The run store: one SQLite database (WAL) plus a folder of checkpoint files.

Layout of a store folder (default ``.flor/`` in the working directory)::

    flor.db               runs, logs, checkpoints, replays
    checkpoints/<run>/    one file per epoch boundary (see checkpoint.py)
    artifacts/<run>/      arrays logged with flor.log
"""
from __future__ import annotations

import json
import os
from array import array
import platform
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import runtime
from .errors import FlorError, UnknownRunError

SCHEMA_VERSION = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    status TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    epochs_completed INTEGER NOT NULL DEFAULT 0,
    epochs_total INTEGER,
    code TEXT NOT NULL,
    deps TEXT NOT NULL DEFAULT '[]',
    args TEXT NOT NULL DEFAULT '{}',
    env TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL DEFAULT '{}',
    timings TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    UNIQUE (name, version)
);
CREATE TABLE IF NOT EXISTS logs (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    name TEXT NOT NULL,
    epoch INTEGER,
    step INTEGER,
    seq INTEGER NOT NULL,
    value NOT NULL,                  -- a number, or JSON text
    kind TEXT NOT NULL DEFAULT 'recorded',
    replay_id INTEGER
);
CREATE INDEX IF NOT EXISTS logs_run ON logs (run_id, kind, name, epoch);
CREATE TABLE IF NOT EXISTS series (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    name TEXT NOT NULL,
    epoch INTEGER,
    kind TEXT NOT NULL,
    replay_id INTEGER,
    typecode TEXT NOT NULL,          -- 'd' (float64) or 'q' (int64); 'Ed'/'Eq': one value per epoch, epochs in steps
    steps BLOB NOT NULL,             -- int64 arrays, one entry per value
    seqs BLOB NOT NULL,
    vals BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS series_run ON series (run_id, kind, name, epoch);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    epoch INTEGER NOT NULL,          -- taken in this epoch; -1: before the epoch loop
    kind TEXT NOT NULL,              -- 'start', 'step' (at the step loop's exit) or 'end' (epoch end)
    path TEXT NOT NULL,
    bytes INTEGER NOT NULL,          -- bytes new on disk (unchanged tensors are shared)
    logical_bytes INTEGER NOT NULL,  -- bytes of the whole state
    checksum TEXT NOT NULL,
    digest TEXT NOT NULL,
    end_digest TEXT,                 -- for 'step' checkpoints: the state at the epoch end, too
    end_path TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (run_id, epoch)
);
CREATE TABLE IF NOT EXISTS digests (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    epoch INTEGER NOT NULL,
    kind TEXT NOT NULL,              -- 'step' (at the step loop's exit) or 'end' (epoch end)
    digest TEXT NOT NULL,            -- JSON {stream: digest}: the state, for epochs without a checkpoint there
    PRIMARY KEY (run_id, epoch, kind)
);
CREATE TABLE IF NOT EXISTS replays (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    code TEXT NOT NULL,
    cells TEXT NOT NULL DEFAULT '{}',
    epochs TEXT NOT NULL,
    probes TEXT NOT NULL DEFAULT '[]',
    started REAL NOT NULL,
    duration REAL,
    status TEXT NOT NULL,
    fidelity TEXT NOT NULL DEFAULT '{}',
    plan TEXT NOT NULL DEFAULT '{}'
);
"""


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

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def duration(self) -> float | None:
        return None if self.ended is None else self.ended - self.started


_JSON_COLS = ("deps", "args", "env", "state", "timings")


class Store:
    """A store folder. Safe to open from several processes (SQLite WAL)."""

    def __init__(self, home: str | os.PathLike | None = None):
        self.home = Path(home) if home else default_home()
        self.home.mkdir(parents=True, exist_ok=True)
        self.db_path = self.home / "flor.db"
        self._local = threading.local()
        self.db.executescript(_SCHEMA)
        self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        found = int(self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0])
        if found != SCHEMA_VERSION:
            raise FlorError(f"The store {self.home} has schema {found}; this flor_nb uses {SCHEMA_VERSION}. "
                            "Use another store (FLOR_NB_HOME) or the flor_nb version that wrote it.")

    # -- connection ------------------------------------------------------------
    @property
    def db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    def _tx(self):
        return _Transaction(self.db)

    def close(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- runs ------------------------------------------------------------------
    def create_run(self, name: str, code: str, **fields) -> Run:
        with self._tx() as db:
            row = db.execute("SELECT COALESCE(MAX(version), 0) FROM runs WHERE name=?", (name,)).fetchone()
            version = row[0] + 1
            cols = {"name": name, "version": version, "status": "running", "started": time.time(), "code": code}
            for key, value in fields.items():
                cols[key] = json.dumps(value) if key in _JSON_COLS else value
            db.execute(
                f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                tuple(cols.values()),
            )
        return self.find_run(f"{name}@{version}")

    def update_run(self, run_id: int, **fields):
        if not fields:
            return
        sets = ", ".join(f"{k}=?" for k in fields)
        values = [json.dumps(v) if k in _JSON_COLS else v for k, v in fields.items()]
        with self._tx() as db:
            db.execute(f"UPDATE runs SET {sets} WHERE id=?", (*values, run_id))

    def all_runs(self) -> list[Run]:
        rows = self.db.execute("SELECT * FROM runs ORDER BY started, id").fetchall()
        return [self._reap(_to_run(r)) for r in rows]

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
        """A run left 'running' by a process that died (a kernel crash) is marked interrupted."""
        pid, host = run.env.get("pid"), run.env.get("host")
        if run.status != "running" or not pid or host != platform.node() or _alive(pid):
            return run
        self.update_run(run.id, status="interrupted", error="the recording process died")
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

    def _insert_groups(self, db, run_id, groups, kind, replay_id):
        plain, packed = [], []
        for n, e, steps, seqs, vals in groups:
            types = set(map(type, vals))
            if len(vals) >= _SERIES_MIN and None not in steps and types <= {float, int}:
                code = "q" if types == {int} else "d"
                packed.append((run_id, n, e, kind, replay_id, code, array("q", steps).tobytes(),
                               array("q", seqs).tobytes(), array(code, vals).tobytes()))
            else:
                plain.extend((run_id, n, e, s, q, v, kind, replay_id) for s, q, v in zip(steps, seqs, vals))
        db.executemany("INSERT INTO logs VALUES (?, ?, ?, ?, ?, ?, ?, ?)", plain)
        db.executemany("INSERT INTO series VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", packed)

    def add_logs(self, run_id: int, rows, kind: str = "recorded", replay_id: int | None = None):
        """rows: iterable of (name, epoch, step, seq, value as runtime.encode gives it)."""
        rows = list(rows)
        if rows:
            with self._tx() as db:
                self._insert(db, run_id, rows, kind, replay_id)

    def add_log_groups(self, run_id: int, groups, kind: str = "recorded", per_unit=()):
        """groups: (name, epoch, steps, seqs, values) with equal-length lists; the fast path for a recorder.

        ``per_unit``: (name, epochs, values) of values logged once per unit outside any step (an iteration
        loop's loss): one packed row per name, typecode ``Ed``/``Eq`` (its ``steps`` blob holds the epochs).
        """
        packed = []
        for name, epochs, values in per_unit:
            code = "q" if all(type(v) is int for v in values) else "d"
            packed.append((run_id, name, None, kind, None, "E" + code, array("q", epochs).tobytes(),
                           bytes(8 * len(epochs)), array(code, values).tobytes()))
        if groups or packed:
            with self._tx() as db:
                self._insert_groups(db, run_id, groups, kind, None)
                db.executemany("INSERT INTO series VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", packed)

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

    def logs(self, run_ids=None, names=None, kind=None) -> list[dict]:
        """Log rows (run_id, name, epoch, step, seq, value, kind, replay_id), in epoch and step order."""
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
        out = [dict(r) for r in self.db.execute(f"SELECT * FROM logs {where}", params)]
        for r in self.db.execute(f"SELECT * FROM series {where}", params):
            code = r["typecode"]
            steps, seqs, vals = (array("q", r["steps"]), array("q", r["seqs"]), array(code[-1], r["vals"]))
            base = {"run_id": r["run_id"], "name": r["name"], "epoch": r["epoch"], "kind": r["kind"],
                    "replay_id": r["replay_id"]}
            if code.startswith("E"):  # one value per unit: the blob holds the units (epochs, iterations)
                out.extend({**base, "epoch": e, "step": None, "seq": 0, "value": v} for e, v in zip(steps, vals))
            else:
                out.extend({**base, "step": s, "seq": q, "value": v} for s, q, v in zip(steps, seqs, vals))
        out.sort(key=_log_order)
        return out

    # -- checkpoints -----------------------------------------------------------
    def add_checkpoint(self, run_id, epoch, kind, path, nbytes, logical_bytes, checksum, digest,
                       end_digest=None, end_path=None):
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, epoch, kind, str(path), nbytes, logical_bytes, checksum, digest, end_digest, end_path,
                 time.time()),
            )

    def add_digest(self, run_id, epoch, kind, digest):
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)", (run_id, epoch, kind, digest))

    def digests(self, run_id) -> dict[tuple[int, str], str]:
        """{(epoch, 'step' | 'end'): JSON digests} recorded where no checkpoint was taken."""
        rows = self.db.execute("SELECT epoch, kind, digest FROM digests WHERE run_id=?", (run_id,))
        return {(r["epoch"], r["kind"]): r["digest"] for r in rows}

    def checkpoints(self, run_id) -> dict[int, sqlite3.Row]:
        rows = self.db.execute("SELECT * FROM checkpoints WHERE run_id=? ORDER BY epoch", (run_id,))
        return {r["epoch"]: r for r in rows}

    def checkpoint_dir(self, run: Run) -> Path:
        return self.home / "checkpoints" / f"{run.name}@{run.version}"

    def artifact_dir(self, run_id: int) -> Path:
        return self.home / "artifacts" / str(run_id)

    # -- replays ---------------------------------------------------------------
    def create_replay(self, run_id, code, cells, epochs, plan) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO replays (run_id, code, cells, epochs, started, status, plan) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, code, json.dumps(cells), json.dumps(epochs), time.time(), "running", json.dumps(plan)),
            )
            return cur.lastrowid

    def finish_replay(self, replay_id, status, duration, probes, fidelity):
        with self._tx() as db:
            db.execute(
                "UPDATE replays SET status=?, duration=?, probes=?, fidelity=? WHERE id=?",
                (status, duration, json.dumps(probes), json.dumps(fidelity), replay_id),
            )

    def replays(self, run_id) -> list[dict]:
        rows = self.db.execute("SELECT * FROM replays WHERE run_id=? ORDER BY id", (run_id,)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            for key in ("cells", "epochs", "probes", "fidelity", "plan"):
                d[key] = json.loads(d[key])
            out.append(d)
        return out

    # -- values, probes, housekeeping (store-management additions) --------------
    def decode(self, text):
        """A stored log value as Python: a number, a JSON value, or an array artifact loaded from disk."""
        value = runtime.from_json(text)
        if isinstance(value, dict) and "__array__" in value:
            path = self.home / value["__array__"]
            return np.load(path) if path.exists() else value
        return value

    def probes_path(self, run: Run) -> Path:
        return self.home / "probes" / f"{run.name}@{run.version}.json"

    def save_probes(self, run: Run, probes: list[dict]) -> Path:
        """Remember a run's probes (``probes/NAME@VERSION.json``, written atomically)."""
        path = self.probes_path(run)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"run": run.label, "probes": list(probes)}, indent=1))
        os.replace(tmp, path)
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


_SERIES_MIN = 16  # step values of one name in one epoch from which they are packed


def _log_order(r):
    e, s = r["epoch"], r["step"]
    return (r["run_id"], e is not None, e or 0, s is not None, s or 0, r["seq"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
