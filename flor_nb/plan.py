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

import itertools
import re
from dataclasses import asdict, dataclass, field

from .errors import EpochSpecError, NoCheckpointError

FULL, SKIP = "full", "skip"
_COST = {FULL: 1.0, SKIP: 0.1}  # relative cost of an epoch, for splitting work across workers
_RUN_ON_SECONDS = 10.0  # a replay runs on this long past its last unit to reach a recorded check of the state


def parse_epochs(spec, completed: int, label: str = "the run", state: dict | None = None) -> list[int]:
    """``3``, ``2-5``, ``1,4,7-9``, an int or a list of ints -> sorted epochs (0-based).
    ``state``: the run's, so an error can say what the loop's own variable was (:func:`loop_values`)."""
    if completed <= 0:
        raise EpochSpecError(f"{label} completed no epoch, so there is nothing to replay. Record it again.")
    if spec is None or spec == "" or spec == "all":
        return list(range(completed))

    def check(lo: int, hi: int):  # before any range is built: "0-99999999999" must not allocate
        if lo < 0 or hi >= completed:
            bad = lo if lo < 0 else max(lo, completed)
            own = loop_values(state, range(completed))
            raise EpochSpecError(f"Epoch {bad} is out of range: {label} completed epochs 0-{completed - 1}"
                                 + (f" (numbered from 0; they are {own} in its loop)" if own else "")
                                 + f". Choose epochs in 0-{completed - 1}.")

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
                raise EpochSpecError(f"Bad epochs {spec!r}: {_what_is_wrong(part, completed)}. Write epochs like 3, "
                                     f"2-5 or 1,4,7-9 (0-based; {label} has epochs 0-{completed - 1}).")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise EpochSpecError(f"Bad epoch range {part!r}: it runs backwards. Write {hi}-{lo}.")
            check(lo, hi)
            epochs.update(range(lo, hi + 1))
    return sorted(epochs)


def own_range(iterable) -> list | None:
    """[start, step] of an epoch loop over ``range(1, n + 1)`` or ``itertools.count(1)``, whose own numbers are
    not flor_nb's (passes from 0); None for one from 0 by 1, or over anything else."""
    if type(iterable) is range:
        r = [iterable.start, iterable.step]
    elif type(iterable) is itertools.count:  # its repr is its only public state: count(1), count(1, 2)
        m = re.fullmatch(r"count\((-?\d+)(?:, (-?\d+))?\)", repr(iterable))
        r = [int(m[1]), int(m[2] or 1)] if m else None
    else:
        r = None
    return r if r and r != [0, 1] else None


def loop_values(state: dict, epochs) -> str:
    """What the recorded loop's own variable was at ``epochs``: "`epoch` = 4-5" for ``for epoch in
    range(1, n + 1)``, whose printed epoch numbers are one more than flor_nb's; "" for a loop from 0 or
    one that is not over a range."""
    r = (state or {}).get("loop_range")
    if not r or not epochs:
        return ""
    start, step = r
    header = (((state.get("loops") or {}).get("epoch") or {}).get("header") or "")
    m = re.match(r"\s*for\s+([A-Za-z_]\w*)\s+in\b", header)
    if isinstance(epochs, range) and epochs.step == 1 and step == 1:
        values = range(start + epochs.start, start + epochs.stop)  # every pass of a long run: kept a range
    else:
        values = [start + e * step for e in sorted(epochs)]
    shown = format_epochs(values) if step == 1 and values[0] >= 0 else \
        ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
    return f"`{m.group(1)}` = {shown}" if m else f"the loop's value = {shown}"


def _what_is_wrong(part: str, completed: int) -> str:
    if not part:
        return "an empty item between commas"
    if re.fullmatch(r"\d+-", part):
        return f"the range {part!r} has no last epoch (did you mean {part}{completed - 1}?)"
    if re.fullmatch(r"-\d+-?", part) or re.fullmatch(r"\d+--\d+", part):
        return f"{part!r} has a negative epoch; epochs count from 0"
    return f"{part!r} is not an epoch number or a range"


def format_epochs(epochs, sep: str = ", ") -> str:
    """[1, 4, 7, 8, 9] -> '1, 4, 7-9' (what :func:`parse_epochs` reads). Spaced, so that iterations 1 and 474
    never read as one thousand four hundred and seventy-four."""
    if isinstance(epochs, range) and epochs.step == 1 and epochs:  # its ends, not a list of 200,000 values
        return str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}"
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
         label: str = "the run", checks=(), unit_seconds: float | None = None) -> list[Segment]:
    """Segments that replay ``epochs`` given checkpoints ``{epoch: kind}``.

    ``step_changed``: the edited code changes the step loop (its kept epochs run in full).
    ``pre_changed``: it changes or logs in the epoch body before the step loop (needs true state there).
    ``checks``: units whose end state was recorded (digested): a segment whose last kept unit has none
    runs on to the next one, when that costs little (``unit_seconds`` each), so its state is verified.
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
    segments = _split(segments, ckpts, workers, mode)
    _run_on_to_checks(segments, sorted(set(checks)), unit_seconds, mode)
    return segments


def _run_on_to_checks(segments: list[Segment], checks: list[int], unit_seconds, mode):
    """Extend each segment to the first recorded check at or after its last unit, unless that costs
    more than ``_RUN_ON_SECONDS`` and more than twice the segment itself.

    An iteration loop digests its state every few hundred iterations, not every one: replaying
    iterations 1000-1010 runs on to the next check (1040, say) so their state is compared too.
    The recorder spaces checks by its overhead budget (about 100 digest times apart), so on a
    busy machine the gap grows; a fixed small limit left the end of a replay unchecked there.
    """
    import bisect

    for seg in segments:
        i = bisect.bisect_left(checks, seg.last)
        if i == len(checks) or checks[i] == seg.last:
            continue
        extra = checks[i] - seg.last
        cost = extra * (unit_seconds or 0.0)
        own = seg.cost() * (unit_seconds or 0.0)
        if unit_seconds is None or cost > max(_RUN_ON_SECONDS, 2 * own):
            continue
        for m in range(seg.last + 1, checks[i] + 1):
            seg.modes[m] = mode(m, False)
        seg.last = checks[i]


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


# -- what a replay will do, in words ------------------------------------------------------
def estimate(run, prepared: dict, inside: list[str] = ()) -> dict:
    """What a prepared replay (:func:`flor_nb.replay.prepare`) will do and how long it should take.

    ``inside``: titles of the probes that log inside the step loop. Returns the plan plus
    ``text`` (one paragraph for a person), ``step_loop`` (whether and why the steps run),
    ``order`` (the epochs in the order the workers report them) and ``modes``.
    """
    segs = prepared["segments"]
    modes = {e: m for s in segs for e, m in s.modes.items()}
    skipped = sorted(e for e, m in modes.items() if m == SKIP)
    full = sorted(e for e, m in modes.items() if m != SKIP)
    inside = list(inside)
    if inside:
        why = f"{', '.join(inside)} log{'s' if len(inside) == 1 else ''} at every step"
    elif prepared["touched"].get("step"):
        why = prepared["touched"].get("why") or "the probes change the step loop"
    else:
        why = "no state was saved after their last step"
    kept = set(prepared["epochs"])
    full_kept = [e for e in full if e in kept]
    full_lead = [e for e in full if e not in kept]
    if skipped and not full:
        step = ("skipped in every epoch: the probes run after the last step, so each epoch resumes from the "
                "state saved after its last step")
    else:
        parts = []
        if full_kept:
            parts.append(f"run in {_plural('epoch', full_kept)} {format_epochs(full_kept)} ({why})")
        if full_lead:
            parts.append(f"run in {_plural('epoch', full_lead)} {format_epochs(full_lead)} on the way "
                         "(no state saved after their last step)")
        if skipped:
            parts.append(f"skipped in {_plural('epoch', skipped)} {format_epochs(skipped)} (resumed from the state "
                         "saved after the last step)")
        step = "; ".join(parts)
    where = "; ".join(_segment_text(s) for s in segs)
    secs = prepared["estimate_seconds"]
    per = run.timings.get("epoch_seconds") or []
    when = ("no recorded epoch timings, so no time estimate" if secs is None else
            f"about {format_seconds(secs)} of training (a recorded epoch took {format_seconds(sum(per) / len(per))}), "
            "plus a few seconds to start the workers and re-run the setup cells")
    n = len(prepared["epochs"])
    run_on = sum(e > max(s.keep) for s in segs for e in s.modes)
    extra = prepared["epochs_to_run"] - n - run_on
    workers = prepared["workers"]
    plural = "s" if extra != 1 else ""
    text = (f"Replays {n} epoch{'s' if n != 1 else ''} ({format_epochs(prepared['epochs'])}) of {run.label} with "
            f"{workers} worker{'s' if workers != 1 else ''}: {where}"
            f"{f' ({extra} earlier epoch{plural} re-run to reach them)' if extra > 0 else ''}"
            f"{f' ({run_on} more run on to reach a recorded check of the state)' if run_on > 0 else ''}. "
            f"Steps: {step}. Expect {when}.")
    if prepared.get("thinned"):  # checkpoints thinned under the store budget: say what they cost
        from .thinning import plan_text

        text += " " + plan_text(run, prepared["thinned"])
    order = [e for s in segs for e in sorted(s.modes)]
    return {**prepared, "text": text, "step_loop": step, "order": order, "modes": modes}


def _plural(word: str, items) -> str:
    return word + ("s" if len(items) > 1 else "")


def _segment_text(seg) -> str:
    span = f"epoch {seg.first}" if seg.first == seg.last else f"epochs {seg.first}-{seg.last}"
    if seg.restore is None:
        return f"{span} from the state saved after epoch {seg.first}'s last step"
    if seg.restore < 0:
        return f"{span} from the checkpoint before the first epoch"
    return f"{span} from the checkpoint after epoch {seg.restore}"


def format_seconds(s: float) -> str:
    """12 ms, 3.4 s, 75 s, 2 min 05 s, 1 h 02 min."""
    if s < 1:
        return f"{s * 1000:.0f} ms" if s < 0.95 else "1 s"
    if s < 90:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    m, sec = divmod(round(s), 60)
    return f"{m} min {sec:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"
