"""Keep a run's checkpoints under a store budget by thinning older ones.

A recording checkpoints as often as its overhead budget allows, so a long run of a
big model can fill a disk. With a budget (``--max-store 2GB``, ``flor.record(...,
max_store="2GB")``), each time the run's checkpoints take more than the budget
its older checkpoints are *thinned*: the checkpoint before the first epoch, the
first epoch's and the latest are always kept, and so is every k-th; the others
go oldest first until the run fits, k doubling (2, 4, ...) when none is left,
so kept checkpoints stay spread out. The run's
size is measured as ``flor.runs()`` reports it: its checkpoint files plus every
blob they refer to (blobs shared with other runs included).

Thinning never makes a replay wrong, only longer: the checkpoint's row goes, its
state digests move to the ``digests`` table (so replays that run through the
epoch still check their state there), and a replay of a later epoch starts from
the previous kept checkpoint, which the plan says with the cost in epochs.
Blobs are deleted only when this run created them, no kept checkpoint of any run
refers to them, and no other recording is alive in the store (it could be about
to reuse one); otherwise they stay for ``flor.gc()``. What was thinned is kept in
the run's ``state["store_budget"]``.
"""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
import warnings
from pathlib import Path

from .errors import FlorError

log = logging.getLogger(__name__)

# The default budget: a quarter of the free space where the store lives when recording starts, at most
# 20 GB: a laptop keeps room to work, and a run of a small model (a few MB per checkpoint) never thins.
DEFAULT_FRACTION = 0.25
DEFAULT_CAP = 20e9

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


class StoreBudgetError(FlorError):
    """A ``max_store`` that is not a size."""


def parse_size(value) -> float:
    """``"2GB"``, ``"500 MB"``, ``"1.5GiB"``, ``3e9`` (bytes) -> bytes; ``"inf"``, ``"none"``, ``"off"`` -> inf."""
    if isinstance(value, (int, float)):
        size = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        if text in ("inf", "none", "off", "unlimited"):
            return math.inf
        m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([a-z]*)", text)
        if not m or m.group(2) not in _UNITS:
            raise StoreBudgetError(f"--max-store {value!r} is not a size. Write it like 2GB, 500MB or 1.5GiB "
                                   "(or inf for no budget).")
        size = float(m.group(1)) * _UNITS[m.group(2)]
    if size <= 0:
        raise StoreBudgetError(f"--max-store {value!r} must be more than 0 bytes (inf for no budget).")
    return size


def default_budget(home) -> float:
    """A quarter of the free disk space at ``home`` (the store folder), at most 20 GB."""
    try:
        free = shutil.disk_usage(Path(home)).free
    except OSError:
        return DEFAULT_CAP
    return min(DEFAULT_CAP, DEFAULT_FRACTION * free)


def budget_for(max_store, home) -> float:
    """The budget in bytes for ``max_store`` (None: the default for the store at ``home``)."""
    return default_budget(home) if max_store is None else parse_size(max_store)


class Thinner:
    """On the recorder's writer thread: after each checkpoint, thin older ones while the run is over budget."""

    def __init__(self, store, run, budget: float, default: bool = False):
        self.store, self.run, self.budget, self.default = store, run, float(budget), default
        self.entries: list[dict] = []  # kept checkpoints, in the order taken
        self.refs: dict = {}  # blob -> [bytes, kept checkpoints referring to it]
        self.file_bytes = 0  # of the kept checkpoint files
        self.blob_bytes = 0  # of the blobs they refer to
        self.index = 0  # epoch checkpoints taken so far (the 'start' one is not counted)
        self.own: set = set()  # blobs this run created
        self.k = 1
        self.thinned: list[int] = []
        self.kinds: dict = {}  # thinned epoch -> the kind of its checkpoint ('step' or 'end')
        self.freed = 0
        self.kept_blobs: set = set()  # this run's blobs that could not be deleted (another recording was alive)
        self.note = ""

    # -- accounting ------------------------------------------------------------------------
    def size(self) -> int:
        """Bytes of the run's kept checkpoints: files plus every blob they refer to, once."""
        return self.file_bytes + self.blob_bytes

    def _count(self, entry: dict, sign: int):
        self.file_bytes += sign * entry["file_bytes"]
        for h, n in entry["blobs"].items():
            ref = self.refs.setdefault(h, [n, 0])
            ref[1] += sign
            if ref[1] == 0:
                del self.refs[h]
                self.blob_bytes -= n
            elif ref[1] == 1 and sign > 0:
                self.blob_bytes += n

    def add(self, epoch: int, kind: str, written: list) -> None:
        """Checkpoint ``epoch`` was written: ``written`` is [(rel path, checkpoint.write's info), ...]."""
        written = [(rel, info) for rel, info in written if info is not None]
        entry = {"epoch": epoch, "kind": kind, "index": None if kind == "start" else self.index,
                 "files": [rel for rel, _ in written],
                 "file_bytes": sum(info.get("file_bytes", 0) for _, info in written), "blobs": {}}
        for _, info in written:
            entry["blobs"].update(info.get("blobs", {}))
            self.own.update(info.get("new_blobs", ()))
        if kind != "start":
            self.index += 1
        for old in [e for e in self.entries if e["epoch"] == epoch]:  # written again (a run left by break)
            self.entries.remove(old)
            self._count(old, -1)
        self.entries.append(entry)
        self._count(entry, +1)
        if math.isinf(self.budget):
            return
        try:
            self._thin()
        except Exception as e:  # noqa: BLE001 - thinning must never stop training or its checkpoints
            log.warning("flor_nb: could not thin the checkpoints of %s: %s", self.run.label, e)
            self.note = f"thinning stopped: {e}"
            self.budget = math.inf

    def _candidates(self) -> list[dict]:
        """Checkpoints that may go at the current k: not the start, the first or the latest; not every k-th."""
        last = self.entries[-1]
        return [e for e in self.entries if e["index"] not in (None, 0) and e is not last and e["index"] % self.k]

    def _thin(self):
        size = self.size()
        while size > self.budget:
            candidates = self._candidates()
            if not candidates:
                if self.k >= max(self.index, 1):  # only the start, the first and the latest are left
                    if not self.note:
                        self.note = (f"the checkpoints kept (the start, the first epoch's and the latest) take "
                                     f"{_fmt(size)}, over the store budget of {_fmt(self.budget)}")
                        warnings.warn(f"flor_nb: {self.run.label}: {self.note}. Record with a larger --max-store.",
                                      stacklevel=2)
                    return
                self.k *= 2
                continue
            self._drop(candidates[0])
            size = self.size()

    # -- deleting one checkpoint -----------------------------------------------------------
    def _drop(self, entry: dict):
        """Delete one checkpoint: its row (digests kept), its files, then the blobs only it held."""
        epoch = entry["epoch"]
        self.entries.remove(entry)
        self._count(entry, -1)
        row = self.store.checkpoints(self.run.id).get(epoch)
        with self.store._tx() as db:
            if row is not None:
                if row["kind"] == "step":  # the state at the step loop's exit, and (if written) at the epoch end
                    db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)",
                               (self.run.id, epoch, "step", row["digest"]))
                    if row["end_digest"]:
                        db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)",
                                   (self.run.id, epoch, "end", row["end_digest"]))
                else:
                    db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)",
                               (self.run.id, epoch, "end", row["digest"]))
            db.execute("DELETE FROM checkpoints WHERE run_id=? AND epoch=?", (self.run.id, epoch))
        for rel in entry["files"]:
            self.freed += _unlink(self.store.home / rel)
        self.thinned.append(epoch)
        self.kinds[str(epoch)] = "both" if entry["kind"] == "step" and len(entry["files"]) > 1 else entry["kind"]
        self._update_state()
        mine = [h for h in entry["blobs"] if h in self.own and h not in self.refs]
        if not mine:
            return
        others = [r for r in self.store.recording() if r.id != self.run.id]
        if others:  # another recording may be about to reuse one of them: leave them for flor.gc()
            self.kept_blobs.update(mine)
            self.note = (f"blobs of thinned checkpoints were left for flor.gc(): "
                         f"{', '.join(r.label for r in others)} was being recorded in the same store")
            return
        referenced = self._referenced_elsewhere()
        from .checkpoint import blob_path

        for h in mine:
            if h not in referenced:
                self.freed += _unlink(blob_path(self.store.home, h))
                self.own.discard(h)

    def _referenced_elsewhere(self) -> set:
        """Blobs that checkpoints of other runs recorded since this one started refer to (only those can
        refer to blobs this run created)."""
        from .housekeeping import references

        found: set = set()
        for r in self.store.all_runs():
            if r.id == self.run.id or (r.ended is not None and r.ended < self.run.started):
                continue
            for row in self.store.checkpoints(r.id).values():
                for rel in (row["path"], row["end_path"]):
                    if rel:
                        try:
                            found |= references(self.store, rel)
                        except FileNotFoundError:
                            continue
        return found

    # -- what was thinned ------------------------------------------------------------------
    def summary(self) -> dict:
        return {"budget": None if math.isinf(self.budget) else self.budget, "default": self.default,
                "every": self.k, "thinned": sorted(self.thinned), "kinds": dict(self.kinds), "freed": self.freed,
                "size": self.size(), "note": self.note}

    def _update_state(self):
        """Record what was thinned at once: a run interrupted later still says so."""
        self.store.update_run(self.run.id, state={**self.run.state, "store_budget": self.summary()})


def _unlink(path: Path) -> int:
    try:
        size = path.stat().st_size
        os.unlink(path)
    except FileNotFoundError:
        return 0
    return size


def _fmt(n: float) -> str:
    from .housekeeping import format_bytes

    return format_bytes(n)


# -- what the replay plan says -------------------------------------------------------------
def thinned_epochs(run) -> list[int]:
    """Epochs whose checkpoint was thinned to keep ``run`` under its store budget."""
    return list(((run.state or {}).get("store_budget") or {}).get("thinned") or [])


def thinned_kinds(run) -> dict:
    """{epoch: kind} of the thinned checkpoints, as the plan's checkpoint kinds ('step', 'end', 'both')."""
    kinds = ((run.state or {}).get("store_budget") or {}).get("kinds") or {}
    return {e: kinds.get(str(e), "end") for e in thinned_epochs(run)}


def plan_costs(run, selected, segments, unthinned) -> dict:
    """Selected epochs that cost more because checkpoints were thinned: ``{epoch: {"thinned": [...],
    "from": the state it starts from, "units": epochs run up to it, "instead": as many without thinning}}``.

    ``unthinned``: the segments the same replay would have had with every checkpoint kept.
    """
    if not thinned_epochs(run):
        return {}
    lost_all = sorted(thinned_epochs(run))

    def costs(segs):
        out = {}
        for seg in segs:
            start = seg.restore if seg.restore is not None else seg.first - 1  # the state it resumes from
            for k in seg.keep:
                modes = [m for e, m in seg.modes.items() if e <= k]
                out[k] = (start, len(modes), sum(1.0 if m == "full" else 0.1 for m in modes), seg.modes.get(k))
        return out

    now, before = costs(segments), costs(unthinned)
    out = {}
    for k in selected:
        if k in now and k in before and now[k][2] > before[k][2] + 1e-9:
            start, units, _, _ = now[k]
            skip = before[k][3] == "skip"  # k's own step-exit checkpoint would have skipped its steps
            out[k] = {"thinned": [t for t in lost_all if start < t < k or (t == k and skip)], "from": start,
                      "units": units, "instead": before[k][1]}
    return out


def plan_text(run, costs: dict) -> str:
    """One sentence for the plan: what the thinned checkpoints cost this replay."""
    if not costs:
        return ""
    budget = ((run.state or {}).get("store_budget") or {}).get("budget")
    why = f" to keep the run under its store budget of {_fmt(budget)}" if budget else ""
    parts = []
    for k, c in sorted(costs.items()):
        where = "before the first epoch" if c["from"] < 0 else f"after epoch {c['from']}"
        span = f" ({c['from'] + 1}-{k})" if c["units"] > 1 else ""
        parts.append(f"epoch {k} runs {c['units']} epoch{'s' if c['units'] != 1 else ''}{span} from the checkpoint "
                     f"{where} (instead of {c['instead']})")
    lost = sorted({t for c in costs.values() for t in c["thinned"]})
    return (f"Checkpoint{'s' if len(lost) > 1 else ''} of epoch{'s' if len(lost) > 1 else ''} "
            f"{', '.join(map(str, lost))} {'were' if len(lost) > 1 else 'was'} thinned{why}: " + "; ".join(parts) + ".")
