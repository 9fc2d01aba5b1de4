"""Which epochs to replay, and from which checkpoints, split into segments for workers."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from .errors import EpochSpecError, NoCheckpointError


def parse_epochs(spec, completed: int, label: str = "the run") -> list[int]:
    """``3``, ``2-5``, ``1,4,7-9``, an int or a list of ints -> sorted epochs (0-based)."""
    if completed <= 0:
        raise EpochSpecError(f"{label} completed no epoch, so there is nothing to replay. Record it again.")
    if spec is None or spec == "" or spec == "all":
        return list(range(completed))
    if isinstance(spec, int):
        epochs = {spec}
    elif isinstance(spec, (list, tuple, set, range)):
        epochs = {int(e) for e in spec}
    else:
        epochs = set()
        for part in str(spec).replace(" ", "").split(","):
            m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
            if not m:
                raise EpochSpecError(
                    f"Bad epoch spec {spec!r} at {part!r}: write epochs like 3, 2-5 or 1,4,7-9 (0-based)."
                )
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise EpochSpecError(f"Bad epoch range {part!r}: the first epoch must not exceed the last.")
            epochs.update(range(lo, hi + 1))
    bad = sorted(e for e in epochs if e < 0 or e >= completed)
    if bad:
        raise EpochSpecError(
            f"Epoch {bad[0]} is out of range: {label} completed epochs 0-{completed - 1}. "
            f"Choose epochs in 0-{completed - 1}."
        )
    return sorted(epochs)


@dataclass
class Segment:
    """Restore checkpoint ``start`` (the state before epoch ``start``), then run ``start..end``."""

    start: int
    end: int
    keep: list[int]

    @property
    def epochs(self) -> list[int]:
        return list(range(self.start, self.end + 1))

    def to_dict(self):
        return asdict(self)


def plan(epochs: list[int], checkpoints: set[int], workers: int, label: str = "the run") -> list[Segment]:
    """Group epochs into segments that each start at a checkpoint; split to use ``workers``."""
    segments: list[Segment] = []
    for k in epochs:
        base = max((b for b in checkpoints if b <= k), default=None)
        if base is None:
            have = ", ".join(map(str, sorted(checkpoints))) or "none"
            raise NoCheckpointError(
                f"No checkpoint at or before epoch {k} in {label} (checkpoints before epochs: {have}). "
                "Record the run again; checkpoints are written at every epoch boundary by default."
            )
        last = segments[-1] if segments else None
        if last is not None and base <= last.end + 1:
            last.end = k  # continue the live run: cheaper than restoring
            last.keep.append(k)
        else:
            segments.append(Segment(base, k, [k]))
    return _split(segments, checkpoints, workers)


def _split(segments: list[Segment], checkpoints: set[int], workers: int) -> list[Segment]:
    """Cut the longest segments at checkpoints until there is one per worker (or no cut is left)."""
    segments = list(segments)
    while len(segments) < workers:
        segments.sort(key=lambda s: s.end - s.start, reverse=True)
        seg = segments[0]
        mid = (seg.start + seg.end + 1) / 2
        cuts = [b for b in checkpoints if seg.start < b <= seg.end and any(k >= b for k in seg.keep)
                and any(k < b for k in seg.keep)]
        if not cuts:
            break
        cut = min(cuts, key=lambda b: abs(b - mid))
        left = Segment(seg.start, cut - 1, [k for k in seg.keep if k < cut])
        right_start = cut
        right = Segment(right_start, seg.end, [k for k in seg.keep if k >= cut])
        segments[0:1] = [left, right]
    segments.sort(key=lambda s: s.start)
    return segments
