"""Storing a recording's log rows: numbered, encoded, packed, committed with the units they belong to.

A unit's rows, its state digests and the count of completed units go to SQLite in one
transaction (see :meth:`RowCommits._commit`), so a kill at any moment leaves a unit either wholly
stored or not at all. On a full disk the store's reserve is freed and the write tried again; rows
that still do not fit are held in memory and written with the next commit.
"""
from __future__ import annotations

import logging
import time
import warnings

import numpy as np

from . import disk, runtime, state
from .hashing import hash_bytes
from .store import packable

logger = logging.getLogger(__name__)
_SERIES_MIN_UNITS = 16  # a name logged once per unit in this many units is stored as one packed row


class RowCommits:
    """The row-storing half of :class:`~flor_nb.recorder.Recorder` (which holds the attributes used here)."""

    def _store_digests(self):
        """Digests taken after the unit's rows were stored, in a transaction of their own (kept for the
        next commit if it fails): a kill mid-checkpoint still leaves the unit checkable."""
        if not self._pending_digests:
            return
        digests, self._pending_digests = self._pending_digests, []
        encoded = [(e, w, runtime.to_json(d)) for e, w, d in digests]
        try:
            self.store.add_digests(self.run.id, encoded)
        except Exception:  # noqa: BLE001 - they go with the next commit
            self._held.append(([], [], None, encoded, ()))

    def _commit(self, rows, completed=None, digests=(), replace=()):
        """Store rows, digests and the count of completed units in one transaction, now.

        On a full disk the store's reserve is freed and the write tried again; if it still fails the
        rows are held in memory and written with the next commit, once space returns.
        """
        start = time.perf_counter()
        if completed is not None and self._start_pending:
            # No unit counts as stored before the start checkpoint is on disk. Its write overlapped the
            # first unit; only a unit shorter than the write (10-15 ms) waits here for the rest, once.
            self._start_written.wait()
            self.start_wait = time.perf_counter() - start
            self._start_pending = False
            self._check_writer()
        per_unit, rest = self._per_unit(rows)
        self._held.append((self._number(rest), per_unit, completed, list(digests), tuple(replace)))
        for attempt in range(2):
            try:
                groups = [g for numbered, *_ in self._held for g in self._encode(numbered)]
                done = max((c for _, _, c, _, _ in self._held if c is not None), default=None)
                self.store.commit_epoch(self.run.id, groups, [d for *_, ds, _ in self._held for d in ds], done,
                                        replace=[e for *_, r in self._held for e in r],
                                        per_unit=[p for _, pu, *_ in self._held for p in pu])
            except Exception as e:  # noqa: BLE001 - a failed write holds the rows; it never stops training
                if attempt == 0 and disk.is_full(e) and disk.release_reserve(self.store.home):
                    continue
                self._hold(e)
                break
            else:
                if self.held_error is not None:
                    logger.warning("flor_nb: %s: the held log rows of %d unit(s) are stored now", self.run.label,
                                   sum(c is not None for _, _, c, _, _ in self._held))
                self._held.clear()
                self.held_error = None
                if done is not None:
                    self._stored_count = max(self._stored_count, done)
                break
        self.commit_seconds.append(time.perf_counter() - start)

    def _hold(self, e):
        """Rows could not be stored: keep them, say so once (with the real cause)."""
        first = self.held_error is None
        self.held_error = e
        if first:
            stored = self._stored_units()
            full = disk.is_full(e)
            why = disk.full_message(self.store.home, "log rows do not fit") if full else \
                f"storing log rows failed with {type(e).__name__}: {str(e).rstrip('.')}"
            when = "as soon as space returns" if full else "with the next commit that succeeds"
            warnings.warn(f"flor_nb: {self.run.label}: {why}. Training goes on; the rows are held in memory and "
                          f"written {when} (units 0-{stored - 1} are stored).", stacklevel=4)

    def _stored_units(self) -> int:
        """Units whose rows are in the store (the held ones are not)."""
        return max(self._stored_count, self.completed_floor)

    @staticmethod
    def _per_unit(rows):
        """Split off names logged once per unit with numbers (an iteration loop's loss: thousands of units
        per flush): they are packed into one array row each, not one group per unit."""
        by_name: dict = {}
        for r in rows:
            by_name.setdefault(r[0], []).append(r)
        per_unit, rest = [], []
        for name, rs in by_name.items():
            epochs = [r[1] for r in rs]
            if (len(rs) >= _SERIES_MIN_UNITS and all(r[2] is None for r in rs) and None not in epochs
                    and len(set(epochs)) == len(epochs) and {type(r[3]) for r in rs} in ({float}, {int})):
                per_unit.append((name, epochs, [r[3] for r in rs]))
            else:
                rest.extend(rs)
        return per_unit, rest

    def _number(self, rows):
        """[(name, epoch, steps, seqs, values)]: rows grouped, repeated (name, epoch, step) keys numbered."""
        groups: dict = {}
        for name, epoch, step, value in rows:
            g = groups.get((name, epoch))
            if g is None:
                g = groups[(name, epoch)] = ([], [])
            g[0].append(step)
            g[1].append(value)
        out = []
        for (name, epoch), (steps, values) in groups.items():
            if epoch is None or len(set(steps)) != len(steps):
                # Repeats: count them (across flushes too for logs outside the epoch loop).
                seen = self._seq if epoch is None else {}
                seqs = []
                for step in steps:
                    q = seen.get((name, step), 0)
                    seen[(name, step)] = q + 1
                    seqs.append(q)
            else:
                seqs = [0] * len(steps)
            out.append((name, epoch, steps, seqs, values))
        return out

    def _encode(self, numbered):
        """Values as stored: numbers, JSON text, arrays as .npy artifacts (files written here)."""
        out = []
        for name, epoch, steps, seqs, values in numbered:
            types = set(map(type, values))
            if types in ({float}, {int}) and packable(steps, values, types):  # per-step numbers: as they are
                out.append((name, epoch, steps, seqs, values))
                continue
            encoded = [
                runtime.encode(v) if type(v) is not np.ndarray
                else save_array(self.store.artifact_dir(self.run.id), self.store.home, name, epoch, s, q, v)
                for s, q, v in zip(steps, seqs, values)
            ]
            encoded = [runtime.to_json(v) if type(v) is dict else v for v in encoded]
            out.append((name, epoch, steps, seqs, encoded))
        return out


def save_array(art_dir, home, name, epoch, step, seq, value) -> dict:
    """Keep a logged array as a private .npy file; the stored reference holds its content hash."""
    disk.make_dir(art_dir)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
    tag = hash_bytes(name.encode("utf-8", "surrogatepass"))[:8]  # names that map to one safe name stay apart
    path = art_dir / f"{safe}-{tag}-e{epoch}-s{step}-{seq}.npy"
    with disk.open_private(path) as f:
        np.save(f, value, allow_pickle=False)
    return {"__array__": path.relative_to(home).as_posix(), "shape": list(value.shape), "dtype": str(value.dtype),
            "hash": state.content_hash(value)}
