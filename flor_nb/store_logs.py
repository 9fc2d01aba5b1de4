"""Log rows in the store: writing them (packed per step where possible), reading them back checked.

Values logged at every step are the bulk of a run (a loss per step): a (name, epoch) with many numeric
step values is stored as one packed row of arrays in ``series``; everything else one row per value in
``logs``. :meth:`LogRows.logs` returns both, row by row. Every value carries a checksum (``crc``): a
damaged value is reported and left out, never returned.
"""
from __future__ import annotations

import warnings
from array import array

import numpy as np

from . import disk, runtime
from .errors import DamagedValueWarning, StoreError
from .schema import packable, row_crc, series_crc
from .store_db import _guard


class LogRows:
    """The log-row methods of a :class:`~flor_nb.store.Store` (a mixin: needs its ``db`` and ``_tx``)."""

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


def _log_order(r):
    e, s = r["epoch"], r["step"]
    return (r["run_id"], e is not None, e or 0, s is not None, s or 0, r["seq"])
