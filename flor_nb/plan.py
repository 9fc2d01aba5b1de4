"""Which epochs to replay, from which checkpoints, and where the step loop can be skipped.

Checkpoints are taken in epoch ``e`` at the step loop's exit (kind ``step``),
at the epoch end (``end``), at both (``both``), or before the loop (``start``, e=-1).
A *segment* is a run of consecutive epochs on one worker. Each epoch in it
runs ``full``, or ``skip``: the step loop is replaced by restoring that epoch's
``step`` checkpoint, so only the code around it runs (Flor's SkipBlock). An
epoch may be skipped when it has a ``step`` checkpoint and the probes do not
touch the step loop; if they also leave the code before the step loop alone,
it needs no earlier state at all (an *independent* epoch).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from .errors import EpochSpecError, NoCheckpointError

FULL, SKIP = "full", "skip"
_COST = {FULL: 1.0, SKIP: 0.1}  # relative cost of an epoch, for splitting work across workers


def parse_epochs(spec, completed: int, label: str = "the run") -> list[int]:
    """``3``, ``2-5``, ``1,4,7-9``, an int or a list of ints -> sorted epochs (0-based)."""
    if completed <= 0:
        raise EpochSpecError(f"{label} completed no epoch, so there is nothing to replay. Record it again.")
    if spec is None or spec == "" or spec == "all":
        return list(range(completed))

    def check(lo: int, hi: int):  # before any range is built: "0-99999999999" must not allocate
        if lo < 0 or hi >= completed:
            bad = lo if lo < 0 else max(lo, completed)
            raise EpochSpecError(f"Epoch {bad} is out of range: {label} completed epochs 0-{completed - 1}. "
                                 f"Choose epochs in 0-{completed - 1}.")

    epochs: set = set()
    if isinstance(spec, int) and not isinstance(spec, bool):
        check(spec, spec)
        epochs = {spec}
    elif isinstance(spec, range):
        if len(spec):
            check(min(spec[0], spec[-1]), max(spec[0], spec[-1]))
        epochs = set(spec)
    elif isinstance(spec, (list, tuple, set)):
        epochs = {int(e) for e in spec}
        if epochs:
            check(min(epochs), max(epochs))
    else:
        for part in str(spec).replace(" ", "").split(","):
            m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
            if not m:
                raise EpochSpecError(
                    f"Bad epoch spec {spec!r} at {part!r}: write epochs like 3, 2-5 or 1,4,7-9 (0-based)."
                )
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise EpochSpecError(f"Bad epoch range {part!r}: the first epoch must not exceed the last.")
            check(lo, hi)
            epochs.update(range(lo, hi + 1))
    return sorted(epochs)


def format_epochs(epochs, sep: str = ",") -> str:
    """[1, 4, 7, 8, 9] -> '1,4,7-9' (what :func:`parse_epochs` reads)."""
    parts, run = [], []
    for e in sorted(epochs):
        if run and e == run[-1] + 1:
            run.append(e)
            continue
        if run:
            parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [e]
    if run:
        parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return sep.join(parts)


@dataclass
class Segment:
    """Run epochs ``first..last``; restore checkpoint ``restore`` before ``first`` (None: no restore)."""

    first: int
    last: int
    keep: list[int]
    restore: int | None
    modes: dict = field(default_factory=dict)

    def cost(self) -> float:
        return sum(_COST[m] for m in self.modes.values())

    def to_dict(self):
        d = asdict(self)
        d["modes"] = {str(k): v for k, v in self.modes.items()}
        return d


def plan(epochs, ckpts: dict, workers: int = 1, step_changed: bool = True, pre_changed: bool = True,
         label: str = "the run") -> list[Segment]:
    """Segments that replay ``epochs`` given checkpoints ``{epoch: kind}``.

    ``step_changed``: the edited code changes the step loop (its kept epochs run in full).
    ``pre_changed``: it changes or logs in the epoch body before the step loop (needs true state there).
    """
    steps = {e for e, kind in ckpts.items() if kind in ("step", "both")}

    def mode(e, kept):
        return SKIP if e in steps and not (kept and step_changed) else FULL

    segments: list[Segment] = []
    for k in epochs:
        prev = segments[-1] if segments else None
        if mode(k, True) == SKIP and not pre_changed:
            if prev is not None and prev.last == k - 1:
                _extend(prev, k, mode)
            else:  # enter at the end of epoch k-1 when it was kept, so the code before the steps sees true state
                resume = k - 1 if ckpts.get(k - 1) in ("start", "end", "both") else None
                segments.append(Segment(k, k, [k], resume, {k: SKIP}))
            continue
        j = max((e for e in ckpts if e < k), default=None)
        if j is None:
            have = ", ".join(map(str, sorted(ckpts))) or "none"
            raise NoCheckpointError(
                f"No checkpoint before epoch {k} in {label} (checkpoints taken in epochs: {have}). "
                "Replay later epochs, or record again with room on disk."
            )
        if prev is not None and prev.last >= j:
            _extend(prev, k, mode)
        else:
            segments.append(_start(j, k, ckpts, mode))
    return _split(segments, ckpts, workers, mode)


def _extend(seg: Segment, k: int, mode):
    for m in range(seg.last + 1, k + 1):
        seg.modes[m] = mode(m, m == k)
    seg.last = k
    seg.keep.append(k)


def _start(j: int, k: int, ckpts: dict, mode) -> Segment:
    """A segment from checkpoint j (taken in epoch j) to kept epoch k."""
    if ckpts[j] == "step":  # only the step-exit state: run epoch j's tail from it, then on
        seg = Segment(j, k, [k], None, {j: SKIP})
    else:  # 'start' (j = -1), 'end' or 'both': restore the end state, then start at the next epoch
        seg = Segment(j + 1, k, [k], j, {})
    for m in range(max(seg.first, j + 1), k + 1):
        seg.modes[m] = mode(m, m == k)
    return seg


def _split(segments: list[Segment], ckpts: dict, workers: int, mode) -> list[Segment]:
    """Cut the costliest segment where a checkpoint allows, while that lowers the largest cost."""
    segments = list(segments)
    while len(segments) < workers:
        segments.sort(key=Segment.cost, reverse=True)
        seg, best = segments[0], None
        for k2 in seg.keep[1:]:
            j = max(e for e in ckpts if e < k2)
            right = _start(j, k2, ckpts, mode)
            for k3 in seg.keep[seg.keep.index(k2) + 1:]:
                _extend(right, k3, mode)
            left_keep = [k for k in seg.keep if k < k2]
            left = Segment(seg.first, left_keep[-1], left_keep, seg.restore,
                           {m: v for m, v in seg.modes.items() if m <= left_keep[-1]})
            worst = max(left.cost(), right.cost())
            if worst < seg.cost() and (best is None or worst < best[0]):
                best = (worst, left, right)
        if best is None:
            break
        segments[0:1] = [best[1], best[2]]
    segments.sort(key=lambda s: s.first)
    return segments
