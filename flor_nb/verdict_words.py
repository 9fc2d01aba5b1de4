"""The words of a replay's verdict: what a user reads about a fidelity dict (see :mod:`flor_nb.verdict`)."""
from __future__ import annotations

from .plan import format_epochs
from .probe_state import describe as describe_probe_changed
from .setup_check import describe as describe_rebuilt
from .verdict import CAVEATS, FAITHFUL, NOT_FAITHFUL, _stream_words, describe, first_cause


def verdict_text(fidelity: dict) -> str:
    """What a user reads: did the replay reproduce the recording, what was compared, what was not."""
    if "level" not in fidelity:  # a replay stored by flor_nb 0.1
        return _legacy_text(fidelity)
    cancelled = fidelity.get("cancelled")
    if cancelled is not None:
        return _cancelled_text(fidelity, cancelled)
    kinds = fidelity.get("kinds") or {}
    parts = []
    for name, m in fidelity["metrics"].items():
        if m["verdict"] == "exact":
            parts.append(f"{name} exact ({m['compared']} value{'s' if m['compared'] != 1 else ''})")
        elif m["verdict"] == "close":
            parts.append(f"{name} within tolerance ({m['exact']} of {m['compared']} values exact, "
                         f"max abs diff {m['max_abs_diff']:.3g})")
        elif m["verdict"] == "diverged":
            parts.append(f"{name} DIVERGED ({m['compared'] - m['exact']} of {m['compared']} differ, "
                         f"max abs diff {m['max_abs_diff']:.3g})")
    compared = [n for n, m in fidelity["metrics"].items() if m["verdict"] in ("exact", "close", "diverged")]
    missing = [n for n, m in fidelity["metrics"].items() if m["verdict"] == "missing"]
    epochs = format_epochs(fidelity["epochs"])
    unit_word = "iteration" if fidelity.get("unit") == "iterations" else "epoch"
    state = fidelity["state"]
    tol = fidelity.get("tolerance")
    if tol and fidelity["level"] != NOT_FAITHFUL:
        out = _tolerance_text(fidelity, tol, parts, compared, epochs, unit_word)
    elif fidelity["level"] != NOT_FAITHFUL:
        head = "Faithful replay" if fidelity["level"] == FAITHFUL else "Replay reproduced the recording, with caveats"
        moved = "changed" in ((fidelity.get("probe_changed") or {}).get("names") or {}).values()
        if moved or any(w.startswith("differs") for w in (fidelity.get("rebuilt_differs") or {}).values()):
            head = "Replay reproduced the recorded training, but NOT every value the probes read (see the end)"
        metric_part = ("recorded metrics reproduced exactly: " + "; ".join(parts)) if compared else \
            f"no recorded metric in {unit_word}{'s' if len(fidelity['epochs']) > 1 else ''} {epochs}"
        unchecked = state.get("unchecked", [])
        unit = "iteration" if fidelity.get("unit") == "iterations" else "epoch"
        points = state["epochs"]
        where = f"{unit}{'s' if len(points) > 1 else ''} {_sample(points)}"
        if state["streams"] and not unchecked:
            if unit == "epoch" and set(points) >= set(fidelity["epochs"]):
                state_part = (f"training state identical to the recording after each replayed epoch "
                              f"({state['streams']} streams)")
            else:
                state_part = (f"training state identical to the recording at {where}, the recorded check "
                              f"points up to and after the replayed {unit}s ({state['streams']} streams)")
        elif state["streams"]:
            state_part = (f"training state identical to the recording at {where} ({state['streams']} "
                          f"streams); NOT checked at or after {unit} {format_epochs(unchecked)} "
                          "(no recorded digest")
            nxt = state.get("next_check")
            state_part += (f"; replay through {unit} {nxt}, the next recorded check, to check them)"
                           if nxt is not None else ")")
        else:
            state_part = "training state NOT checked (no recorded digest for these epochs)"
            errors = fidelity.get("digest_errors")
            if errors:
                state_part += f"; the recording could not digest it in unit {errors[0][0]}: {errors[0][1]}"
        out = f"{head}: {metric_part}; {state_part}"
    else:
        out = "Replay NOT faithful: "
        details = []
        if state["diverged"]:
            first = state["diverged"][0]
            details.append(describe(first, kinds, fidelity.get("probes_draw", True), unit_word))
            others = sorted({s for e in state["diverged"] for s in e["differ"] + e["missing"]}
                            - {first_cause(first, kinds)})
            if others:
                details.append(f"also differing: {', '.join(others[:6])}{' ...' if len(others) > 6 else ''}")
        bad = [p for p in parts if "DIVERGED" in p]
        if bad:
            details.append("; ".join(bad))
        details.extend(fidelity.get("problems", []))
        if fidelity.get("cause"):
            details.append(fidelity["cause"])
        out += ". ".join(d.rstrip(".") for d in details)
    if tol:
        out = out.rstrip(".") + _device_notes(tol)
    if missing:
        out += (f". Not compared: {', '.join(missing)} (the replayed code does not log "
                f"{'it' if len(missing) == 1 else 'them'})")
    nc = fidelity.get("not_compared", {})
    clock = [f"{word}{'s' if len(nc[k]) > 1 else ''} {', '.join(nc[k])}"
             for k, word in (("metrics", "metric"), ("variables", "variable")) if nc.get(k)]
    clock += [f"attribute{'s' if ',' in a else ''} {a}" for a in nc.get("attributes", [])]
    if clock:
        out += f". Not compared (wall-clock values, different in every run): {'; '.join(clock)}"
    left = nc.get("left_out")
    if left:
        n = len(left["epochs"])
        out += (f". Not compared at the end of epoch{'s' if n > 1 else ''} {format_epochs(left['epochs'])}, where this "
                f"replay skipped the step loop: {_stream_words(left['values'])} (the checkpoint left them out; the "
                "next epoch recomputes them before any read)")
    damaged = fidelity.get("damaged_checkpoints") or {}
    if damaged:
        out += (f". Damaged checkpoint{'s' if len(damaged) > 1 else ''} of epoch{'s' if len(damaged) > 1 else ''} "
                f"{', '.join(sorted(damaged, key=int))} skipped: replayed from the nearest earlier intact one "
                f"({'; '.join(damaged.values())})")
    read = fidelity.get("not_captured_read") or {}
    if read:
        listed = "; ".join(f"{p} ({why})" for p, why in list(read.items())[:4])
        out += (f". Not captured but read by the replayed code: {listed}. Values that depend on "
                f"{'it' if len(read) == 1 else 'them'} may differ from the recording")
    head = fidelity.get("head")
    if head and head["differs"]:
        out += (f". The lines added before the {unit_word} loop ran on a state other than the recording's when its "
                f"loop started ({_stream_words(head['differs'])}): what they logged may differ from a run with them "
                "from the start")
    tail = fidelity.get("tail")
    if tail and not tail["ran"]:
        out += f". {tail['why'] if tail['last'] is None else tail['why'] + ', but the replay ended before it'}"
    out += describe_rebuilt(fidelity.get("rebuilt_differs") or {})
    changed = fidelity.get("probe_changed") or {}
    out += describe_probe_changed(changed.get("names") or {}, changed.get("starts") or [], changed.get("epochs") or [],
                                  unit_word)
    writes = fidelity.get("writes") or []
    if writes:
        names = ", ".join(writes[:4]) + (f" and {len(writes) - 4} more" if len(writes) > 4 else "")
        out += (f". Note: the replayed code wrote {names}; {'it holds' if len(writes) == 1 else 'they hold'} what "
                "the replay computed now, not what training left there")
    removed = fidelity.get("removed") or []
    if removed:
        names = ", ".join(removed[:4]) + (f" and {len(removed) - 4} more" if len(removed) > 4 else "")
        out += f". Note: the replayed code removed {names}, which existed before the replay"
    return out.rstrip(".") + "."


def _tolerance_text(fidelity, tol, parts, compared, epochs, unit_word) -> str:
    head = "Replay matches the recording within tolerance, not bit-exactly"
    why = "; ".join(tol["reasons"])
    metric_part = ("recorded metrics: " + "; ".join(parts)) if compared else \
        f"no recorded metric in {unit_word}{'s' if len(fidelity['epochs']) > 1 else ''} {epochs}"
    differ = tol.get("state_differs") or []
    state_part = (f"training state digests differ in {len(differ)} stream(s) ({', '.join(differ[:4])}"
                  f"{' ...' if len(differ) > 4 else ''}), as expected at the bit level" if differ else
                  "training state digests identical to the recording")
    if not differ and not tol.get("max_abs_diff"):  # exact this time, but nothing made it so: say both
        return (f"Replay reproduced the recording bit for bit this time (max abs diff 0), but exactness is not "
                f"guaranteed for this run, so it is judged within tolerance (rtol {tol['rtol']:g}, atol "
                f"{tol['atol']:g}). Why not guaranteed: {why}. {metric_part[0].upper()}{metric_part[1:]}; "
                f"{state_part}")
    return (f"{head} (compared with rtol {tol['rtol']:g}, atol {tol['atol']:g}; max abs diff "
            f"{tol.get('max_abs_diff', 0.0):.3g}). Why not exact: {why}. {metric_part[0].upper()}{metric_part[1:]}; "
            f"{state_part}")


def _device_notes(tol) -> str:
    out = ""
    if tol.get("mapped"):
        out += f". Device variables pointed at the replay's device: {', '.join(tol['mapped'])}"
    if tol.get("misplaced"):
        out += f". {'; '.join(tol['misplaced'])}"
    if tol.get("flag_problems"):
        out += f". Recorded settings that could not be set here: {'; '.join(tol['flag_problems'])}"
    return out


def _sample(points, most=8) -> str:
    """1,20,260 ... 1040: a long list of check points, shortened."""
    text = format_epochs(points)
    if text.count(",") < most:
        return text
    return f"{format_epochs(points[:4])} ... {format_epochs(points[-3:])} ({len(points)} points)"


def _cancelled_text(fidelity: dict, cancelled: dict) -> str:
    """A cancelled replay: which epochs were kept, and the verdict on those only."""
    kept, lost = cancelled.get("kept") or [], cancelled.get("lost") or []
    asked = format_epochs(cancelled.get("requested") or [])
    if not kept:
        return (f"Replay cancelled before any epoch's results were kept (asked for epochs {asked}): nothing was "
                "compared and no values were stored. Replay again, or fewer epochs.")
    rest = {k: v for k, v in fidelity.items() if k != "cancelled"}
    if rest.get("level") == CAVEATS and not rest.get("not_captured_read") and not rest["state"].get("unchecked"):
        rest["level"] = FAITHFUL  # the caveat is the cancellation, said in front
    head = (f"Cancelled: partial results for epoch{'s' if len(kept) > 1 else ''} {format_epochs(kept)} of {asked}"
            + (f" (epoch{'s' if len(lost) > 1 else ''} {format_epochs(lost)} did not finish and kept nothing)"
               if lost else ""))
    return f"{head}. For the kept epochs: {verdict_text(rest)}"


def _legacy_text(fidelity: dict) -> str:
    parts = [f"{n} {m['verdict']}" for n, m in fidelity.get("metrics", {}).items()]
    head = "Faithful replay (recorded by flor_nb 0.1)" if fidelity.get("faithful") else "Replay NOT faithful"
    return f"{head}: " + ("; ".join(parts) or "no recorded metric") + "."
