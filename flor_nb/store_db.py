"""The store's SQLite connection: creating the folder, opening and migrating the schema, transactions.

Database errors become :class:`~flor_nb.errors.StoreError` (:class:`~flor_nb.errors.DiskFullError` for a
full disk) naming the store and what to do (:func:`_guard`).
"""
from __future__ import annotations

import functools
import logging
import os
import sqlite3
from pathlib import Path

from . import disk
from .errors import DiskFullError, StoreError
from .schema import MIGRATE, SCHEMA, SCHEMA_VERSION

logger = logging.getLogger("flor_nb.store")  # the store's logger, named as before this module was split out


def _guard(fn):
    """Database errors become StoreError (DiskFullError for a full disk) naming the store and the fix."""
    @functools.wraps(fn)
    def guarded(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except sqlite3.Error as e:
            raise self._error(e, fn.__name__) from e
    return guarded


class Database:
    """The connection half of a :class:`~flor_nb.store.Store`: one connection per thread, WAL.

    Needs ``home``, ``db_path`` and ``_local`` (a ``threading.local``) set by the store."""

    home: Path
    db_path: Path

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
