"""Checkpoints while a cell records: when one is due, taking its snapshot, writing it on the writer thread.

The training thread copies a snapshot into :class:`~flor_nb.snapshot_pool.BufferPool` buffers and hands
it to the writer thread, which has the saver process (saver.py) write its blobs and file, or writes them
itself, then stores the index row. A failed write stops checkpoints, never training.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings

from . import devices, disk, objstore, runtime, saver
from .errors import NotCapturedWarning
from .paths import root
from .saver import SaverGone

log = logging.getLogger(__name__)


class Checkpointing:
    """The checkpoint half of :class:`~flor_nb.recorder.Recorder` (which holds the attributes used here)."""

    def _due(self, k) -> bool:
        """Checkpoint unit k? Every unit while affordable; else every ``_period_ckpt`` units (see :meth:`_tune`).

        After the first unit, training never waits for the writer: while it is still writing the
        previous checkpoint, this one is deferred to a later unit (a digest still checks the state here).
        With a big state (1.6 GB at 100M params) a write can outlast an epoch; waiting blocked training
        for seconds per epoch, and a second snapshot in flight doubled the memory the snapshot pool holds.
        The first unit (no unit time known yet) waits for the start checkpoint, so it gets one.
        """
        if self.checkpoint_error or k - self._last_ckpt < self._period_ckpt:
            return False
        if math.isinf(self.overhead):  # every unit, whatever it costs (--overhead inf)
            return True
        return not (self._recent and self.writer.busy())

    def _snapshot(self, dead=None):
        start = time.perf_counter()
        snap = self.capturer.snapshot(pool=self.pool, dead=dead)
        seconds = time.perf_counter() - start
        self._announce(snap)
        return snap, seconds

    def _announce(self, snap):
        """Say once, when first seen, what cannot be captured: replay could not restore it."""
        self.notes.update(snap["notes"])
        self.data.update(snap["data"])
        self.outputs.update(snap["outputs"])
        self.roots = snap["roots"]
        if not self._gpu_state:
            self._gpu_state = devices.on_cuda(snap["python"].get("devices") or {})
        self._tell_not_captured(snap["not_captured"])

    def _tell_not_captured(self, found: dict):
        """List what is not captured, and warn once, when first seen (a snapshot's walk; data training changed)."""
        new = {p: why for p, why in found.items() if p not in self.not_captured}
        if new:
            self.not_captured.update(new)
            # Values captured only because an earlier training changed them (record.py): listed, and named by a
            # replay that reads them, but the recorded cell never reads them, so not worth a warning.
            new = {p: why for p, why in new.items() if root(p) not in self.quiet_roots}
        if new:
            listed = "; ".join(f"{p}: {why}" for p, why in new.items())
            warnings.warn(f"flor_nb: not captured in {self.run.label}: {listed}. Replay rebuilds "
                          f"{'it' if len(new) == 1 else 'these'} from the recorded cells instead of restoring "
                          "the recorded state; a replay that reads them says so in its verdict.",
                          NotCapturedWarning, stacklevel=5)

    def _checkpoint(self, epoch: int, kind: str, taken, end_taken=None):
        if taken is None or self.checkpoint_error:
            return
        snap, copy_seconds = taken
        end_snap, end_seconds = end_taken or (None, 0.0)
        if not self.objects:
            self.objects = self.capturer.kinds
        waited = self.writer.submit_checkpoint(self._persist, epoch, kind, snap, end_snap)
        self.snapshot_seconds.append(copy_seconds + end_seconds + waited)
        self._last_ckpt = self._last_digest = epoch
        self._check_writer()

    def _persist(self, epoch, kind, snap, end_snap):
        """On the writer thread: blobs and files, then the index row. A full disk frees the store's
        reserve, so log rows keep fitting after checkpoints stop."""
        start, cpu = time.perf_counter(), time.thread_time()
        saver_cpu = 0.0
        try:
            if self.writer.errors:
                # Checkpoints stopped: an earlier write failed after this one was queued. Writing it
                # would fill the space a full disk's released reserve freed for log rows.
                self.pool.release(snap)
                self.pool.release(end_snap)
                return
            saver_cpu = self._write_checkpoint(epoch, kind, snap, end_snap)
        except BaseException as e:
            if disk.is_full(e):
                disk.release_reserve(self.store.home)
            raise
        finally:
            self.write_seconds.append(time.perf_counter() - start)
            self.write_cpu_seconds.append(time.thread_time() - cpu + saver_cpu)
            if epoch == -1:  # written (or failed): units may count as stored from now on (rows.py)
                self._start_written.set()

    def _write_checkpoint(self, epoch, kind, snap, end_snap) -> float:
        """Write one checkpoint (by the saver process when there is one) and index it; returns the saver's CPU
        seconds (the writer thread's own are counted by :meth:`_persist`)."""
        folder = f"checkpoints/{self.run.name}@{self.run.version}"
        rel = f"{folder}/epoch-{epoch:05d}.{kind}.ckpt"
        end_rel = None if end_snap is None else f"{folder}/epoch-{epoch:05d}.end.ckpt"
        home = objstore.root(self.store.home, self.run.env)  # the store's folder, or the run's blob location
        out = self._save(home, rel, snap, end_rel, end_snap)
        info, end = out["info"], out["end"]
        try:
            digests = out["digests"]
            if epoch >= 0 and digests[0] is not None:
                where = [(epoch, kind, digests[0])] + ([(epoch, "end", digests[1])] if digests[1] is not None else [])
                self.store.add_digests(self.run.id, [(e, k, runtime.to_json(d)) for e, k, d in where])
            if out["error"] is not None:
                raise out["error"]
            self.store.add_checkpoint(
                self.run.id, epoch, kind, rel, info["bytes"] + (end["bytes"] if end else 0), info["logical_bytes"],
                info["checksum"], runtime.to_json(info["digests"]),
                None if end is None else runtime.to_json(end["digests"]), end_rel)
        except BaseException:
            if not objstore.is_url(home):  # never indexed: of no use to a replay, and it holds space
                for written in [r for r, i in ((rel, info), (end_rel, end)) if i is not None]:
                    with contextlib.suppress(OSError):
                        os.unlink(disk.inside(home, written))
            raise
        self.checkpointed.append(epoch)
        self.pool.release(snap)  # written: its buffers can hold the next snapshot
        self.pool.release(end_snap)
        if self.thinner is not None:
            self.thinner.add(epoch, kind, [(rel, info), (end_rel, end)])
        return out.get("cpu", 0.0)

    def _save(self, home, rel, snap, end_rel, end_snap) -> dict:
        """:func:`flor_nb.saver.save_here`, by the saver process when it is up, else on this (writer) thread
        (also once CUDA snapshots went to private pinned buffers, which the saver could only get by copy)."""
        if self.saver is not None and self.saver.usable() and not self.pool.shared.pin_failed:
            try:
                out = self.saver.save(home, rel, snap, end_rel, end_snap)
                self.saver_writes += 1
                self.saver_cpu += out["cpu"]
                return out
            except SaverGone as e:
                log.warning("flor_nb: %s while writing %s; it and later checkpoints of %s are written by the "
                            "kernel's writer thread instead (nothing is lost).", e, rel, self.run.label)
        return saver.save_here(home, rel, snap, end_rel, end_snap)

    def _check_writer(self):
        """Surface a failed checkpoint write once, as what it is: it stops checkpoints, never training."""
        if self.writer.errors and not self.checkpoint_error:
            e = self.writer.errors[0]
            after = f"checkpoints stopped after epoch {max(self.checkpointed, default=-1)}"
            advice = ("Training goes on and its logs keep being stored; replay starts from the nearest earlier "
                      "checkpoint.")
            if disk.is_full(e):
                self.checkpoint_error = f"{after}: {disk.full_message(self.store.home, 'a checkpoint did not fit')}"
                advice += " Free space before recording again."
            else:
                self.checkpoint_error = f"{after}: writing a checkpoint failed with {type(e).__name__}: {e}"
            warnings.warn(f"flor_nb: {self.checkpoint_error}. {advice}", stacklevel=3)
