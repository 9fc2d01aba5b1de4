"""Plan a replay without running it: validate the edit, choose the units, segments and workers, say why."""
from __future__ import annotations

import warnings

from . import checkpoint, liveness, machine, runtime, thinning, validate
from .checkpoint import CorruptCheckpointError
from .edits import added_around, changes, helper_reads_after_steps, helper_touched, probe_carried
from .errors import FlorError, NoCheckpointError
from .instrument import instrument, parse, recorded_loops
from .plan import format_epochs, loop_values, parse_epochs, plan
from .stand_in import stand_ins
from .store import Run, Store


def prepare(store: Store, run: Run, code=None, epochs=None, cells=None, workers=None, damaged=None,
            slots=None) -> dict:
    """Validate and plan a replay without running it: what will run, where, and an estimate.

    ``damaged``: {epoch: why} of checkpoints found damaged; the plan starts from intact ones.
    ``slots``: how many tasks the executor runs at once when it is not this machine's pool (a cluster's
    worker threads); then the cluster, not this machine's cores, bounds the workers.
    """
    workers = validate.workers(workers)
    code = run.code if code is None else code
    hint = recorded_loops(run.state)  # the loops the recording used: the edited cell's are found by their headers
    _, loops = instrument(code, what="replayed cell", hint=hint)  # syntax errors, missing loops: at their line
    _warn_moved(hint, loops)
    deps = [dict(c) for c in run.deps]
    for count, source in (cells or {}).items():
        match = [c for c in deps if c["count"] == int(count)]
        if not match:
            known = ", ".join(f"In[{c['count']}]" for c in deps) or "none"
            raise FlorError(f"Cell In[{count}] is not a dependency of {run.label} (its cells: {known}).")
        parse(source, what=f"edited cell In[{count}]")
        match[0]["recorded_source"], match[0]["source"] = match[0]["source"], source  # probe_rng compares them
    # An earlier training cell whose values the checkpoint holds: not trained again in every worker's setup.
    stand = stand_ins(deps, code, run.state.get("roots") or (), run.state.get("not_captured") or {},
                      run.state.get("setup_digests") or {}, edited={int(k) for k in (cells or {})})
    selected = parse_epochs(epochs, run.epochs_completed, run.label, run.state)
    # A probe's running total (bound before the loop, read in it): built from the first unit on, in one worker
    # (a second segment would start it again, empty).
    sequential = probe_carried(run.code, code, loops.epoch_line)
    carried_why = ""
    if sequential and selected:
        word = "iteration" if (hint or {}).get("unit") == "iterations" else "epoch"
        start = f"the replay starts at {word} 0 to build" if min(selected) > 0 else "the replay builds"
        selected = list(range(0, max(selected) + 1))
        carried_why = (f"The probes keep {', '.join(sequential)} from one {word} to the next, which no checkpoint "
                       f"holds: {start} {'it' if len(sequential) == 1 else 'them'} in one worker")
    head, tail, selected, head_why, tail_why = _around_loop(run, code, loops, hint, selected)
    ckpts = {e: r for e, r in store.checkpoints(run.id).items() if e not in (damaged or {})}
    extra = store.digests(run.id)  # the state at epochs without a checkpoint: replay still checks it
    # Checkpoints lacking what the edited code reads first; step-exit states lacking what it reads after the steps.
    left_out, no_skip, left_why = _left_out(run, code, deps, ckpts, list((cells or {}).values()))
    helper = (hint or {}).get("helper")
    touched = helper_touched(run.code, code, helper, hint) if helper else changes(run.code, code, hint)
    if cells:  # an edited helper may run inside the step loop
        touched["step"] = True
    carried = helper_reads_after_steps(next((c["source"] for c in deps if c["count"] == helper["cell"]), ""),
                                       helper, code) if helper and not touched["step"] else []
    if carried:
        if set(carried) <= set(helper.get("carry") or ()):  # kept with the step-exit states: skippable
            no_skip = set(no_skip) | set(run.state.get("uncarried") or ())  # but where they could not be kept
        else:  # its locals after a skipped step loop would be those from before it
            touched = {**touched, "step": True, "why": f"{helper['name']}() reads {', '.join(carried)} after its "
                       f"step loop, which sets {'them' if len(carried) > 1 else 'it'}" if carried != ["?"] else
                       f"the step loop of {helper['name']}() is not in its cell as recorded"}
    kinds = {e: "both" if r["end_path"] else r["kind"] for e, r in ckpts.items() if e not in left_out}
    kinds = {e: "end" if e in no_skip and k == "both" else k for e, k in kinds.items()
             if not (e in no_skip and k == "step")}
    # Float reductions depend on the thread count: replay with the recorded one, so results are
    # bit-exact, and by default start only as many workers as the cores allow at that count.
    threads = int(run.env.get("threads") or 1)
    cores = machine.usable_cpus()
    fit = slots or max(1, cores // threads)
    if workers and workers > fit and not slots:
        # Oversubscribed torch threads run many times slower (measured: 2x2 threads on 2 cores, 5-16x).
        warnings.warn(f"flor_nb: {workers} workers x {threads} torch threads (as recorded, for exact results) do "
                      f"not fit on {cores} cores; using {fit}. Record with torch.set_num_threads(1) to replay "
                      "epochs in parallel.", stacklevel=3)
    max_workers = min(workers or fit, fit)
    per_epoch = run.timings.get("epoch_seconds") or []
    unit_seconds = run.timings.get("unit_seconds_mean") or (sum(per_epoch) / len(per_epoch) if per_epoch else None)
    checks = [e for (e, k) in extra if k == "end"] + [e for e, r in ckpts.items() if r["end_digest"] or r["kind"] == "end"]
    if sequential:
        max_workers = 1
    segments = plan(selected, kinds, max_workers, touched["step"], touched["pre"], run.label, checks, unit_seconds)
    workers = min(max_workers, len(segments))
    mean = sum(per_epoch) / len(per_epoch) if per_epoch else None
    costs = sorted((s.cost() for s in segments), reverse=True)
    load = [0.0] * workers
    for c in costs:  # greedy: what the slowest worker will do
        load[load.index(min(load))] += c
    skipped = sum(m == "skip" for s in segments for m in s.modes.values())
    thinned = {}
    if thinning.thinned_epochs(run):  # checkpoints thinned under the store budget: what they cost this replay
        unthinned = plan(selected, {**thinning.thinned_kinds(run), **kinds}, max_workers, touched["step"],
                         touched["pre"], run.label, checks, unit_seconds)
        thinned = thinning.plan_costs(run, selected, segments, unthinned)
    return {
        "code": code,
        "loops": hint,  # the worker instruments with it, so it picks the same loops
        "cells": [dict(c, source=stand[c["count"]]) if c["count"] in stand else c for c in deps],
        "edited_cells": {int(k): v for k, v in (cells or {}).items()},
        "epochs": selected,
        "segments": segments,
        "workers": workers,
        "threads": threads,
        "touched": touched,
        # Where each checkpoint's state can be entered: at the step loop's exit, or at an epoch's end.
        "step_paths": {str(e): r["path"] for e, r in ckpts.items() if r["kind"] == "step"},
        "step_digests": {**{str(e): runtime.from_json(d) for (e, k), d in extra.items() if k == "step"},
                         **{str(e): runtime.from_json(r["digest"]) for e, r in ckpts.items() if r["kind"] == "step"}},
        "resume_paths": {str(e): r["end_path"] or r["path"] for e, r in ckpts.items()
                         if r["end_path"] or r["kind"] != "step"},
        "end_digests": {**{str(e): runtime.from_json(d) for (e, k), d in extra.items() if k == "end"},
                        **{str(e): runtime.from_json(r["end_digest"] or r["digest"]) for e, r in ckpts.items()
                           if r["end_digest"] or r["kind"] == "end"}},
        "epochs_to_run": sum(len(s.modes) for s in segments),
        "epochs_skipping_steps": skipped,
        "estimate_seconds": None if mean is None else mean * max(load),
        "thinned": thinned,
        "tail": tail,  # the last unit, after which the segment ending there runs the cell's lines after the loop
        "tail_why": tail_why,
        "head": head,  # lines added before the loop: the segment from unit 0 keeps what they log
        "head_why": head_why,
        "start_digest": (runtime.from_json(ckpts[-1]["digest"]) if head and -1 in ckpts and ckpts[-1]["digest"]
                         else None),
        "summary": _describe(selected, segments, workers, touched, hint.get("unit") if hint else None,
                             _own_numbers(run, selected)) + (
            f". {thinning.plan_text(run, thinned)}" if thinned else "") + (
            f". {left_why}" if left_why else "") + (
            f". {carried_why}" if carried_why else "") + (
            f". {tail_why}" if tail_why else "") + (
            f". {head_why}" if head_why else "") + (
            f". {_cells_word(stand)} an earlier training: not run again (its values come from the checkpoint)"
            if stand else ""),
    }


def _around_loop(run: Run, code: str, loops, hint, selected) -> tuple:
    """Lines added before and after the loop: (whether there are lines before it; the last unit, after which the
    lines after it run, or None; the selection, from unit 0 and through that unit as needed; why for each, for the
    plan)."""
    before, after = ([], []) if (hint or {}).get("framework") else added_around(run.code, code, loops.epoch_line)
    word = "iteration" if (hint or {}).get("unit") == "iterations" else "epoch"
    head_why = tail_why = ""
    last = None

    def lines(added):
        return f"line{'s' if len(added) > 1 else ''} {', '.join(map(str, added[:4]))}{' ...' if len(added) > 4 else ''}"

    if after and (run.status != "finished" or not run.epochs_completed):
        tail_why = (f"The lines added after the {word} loop ({lines(after)}) do not run: the recording did not finish "
                    f"its loop (it is {run.status})")
    elif after:
        last = run.epochs_completed - 1
        tail_why = (f"The lines added after the {word} loop ({lines(after)}) run after {word} {last}, on the state "
                    "training left" + ("" if last in selected else f", so the replay runs {word} {last} too"))
        selected = sorted(set(selected) | {last})
    if before:
        head_why = (f"The lines added before the {word} loop ({lines(before)}) log from the worker that starts at "
                    f"{word} 0" + ("" if not selected or 0 in selected else f", so the replay runs {word} 0 too"))
        selected = sorted(set(selected) | {0}) if selected else selected
    return bool(before), last, selected, head_why, tail_why


def _cells_word(counts) -> str:
    listed = ", ".join(f"In[{c}]" for c in sorted(counts))
    return f"{listed} {'is' if len(counts) == 1 else 'are'}"


def intact_plan(store, run, code, epochs, cells, workers, damaged: dict, slots=None) -> dict:
    """After damage was found: a plan whose checkpoints all verify here first (a damaged blob is often
    shared by several checkpoints), so workers are not sent to fail one checkpoint at a time."""
    while True:
        try:
            p = prepare(store, run, code, epochs, cells, workers, damaged, slots)
        except NoCheckpointError as e:
            first = next(iter(damaged.values()))
            raise NoCheckpointError(f"{e} The checkpoints of epoch(s) {', '.join(map(str, sorted(damaged)))} are "
                                    f"damaged ({first})") from None
        used = {}
        for seg in p["segments"]:
            if seg.restore is not None:
                used[seg.restore] = p["resume_paths"][str(seg.restore)]
            for e, mode in seg.modes.items():
                if mode == "skip":
                    used[e] = p["step_paths"][str(e)]
        for e, rel in sorted(used.items(), reverse=True):
            try:
                checkpoint.verify(blobs_of(run) or store.home, rel)
            except CorruptCheckpointError as bad:
                damaged[e] = str(bad)
                break
        else:
            return p


def _warn_moved(hint, loops):
    """The recorded step loop is gone from the edited cell (its header was edited): say which loop is used."""
    want = (hint or {}).get("step")
    if want and not loops.step_explicit and loops.step_header != want["header"]:
        where = f"line {loops.step_line} `{loops.step_header}`" if loops.step_line else "no loop"
        warnings.warn(f"flor_nb: the recorded step loop `{want['header']}` is not in the edited cell; using {where} "
                      "as the step loop. Keep the loop's header as recorded, or mark it with flor.loop(\"step\", ...).",
                      stacklevel=4)


def _holders(run: Run) -> set[str]:
    """The recorded variables that hold gradients: modules and optimizers (by their root name)."""
    import re

    return {re.split(r"[.\[]", path, maxsplit=1)[0] for path, kind in (run.state.get("objects") or {}).items()
            if kind in ("module", "optimizer")}


def _left_out(run: Run, code: str, deps, ckpts, edited=()) -> tuple[set, set, str]:
    """(epochs, steps, why): checkpoints that left out values the edited code reads before it recomputes them
    (see liveness.py), so the plan starts from others; epochs whose step-exit state lacks what the edited code
    after the step loop reads, so they run their step loop; (set(), set(), "") when it needs nothing they lack."""
    dead = liveness.Dead.from_json(run.state.get("dead"))
    if not dead:
        return set(), set(), ""
    need = liveness.for_replay(dead, code, run.code, run.state.get("loops") or {}, [c["source"] for c in deps],
                               edited, [c["source"] for c in run.deps], _holders(run))
    if not need.names and not need.grads and not need.tail:
        return set(), set(), ""
    state = run.state
    # None: a run killed before it ended; any of its checkpoints may lack them
    ends = set(state["omitting"]) if state.get("omitting") is not None else \
        {e for e, r in ckpts.items() if e >= 0 and (dead.steps or r["kind"] == "end")}
    steps = set(state["omitting_steps"]) if state.get("omitting_steps") is not None else {e for e in ckpts if e >= 0}
    unit = "iterations" if (state.get("loops") or {}).get("unit") == "iterations" else "epochs"
    if need.names or need.grads:
        epochs = ends | steps if dead.steps else ends
        what = ", ".join(sorted(need.names)) + (" and " if need.names and need.grads else "") + \
            ("the gradients" if need.grads else "")
        them = "them" if need.grads or len(need.names) > 1 else "it"
        return epochs, set(), (f"The probes read {what} before the loop body recomputes {them}; the checkpoints of "
                               f"{len(epochs)} {unit} left {them} out, so the replay starts from checkpoints that "
                               "kept everything")
    if not steps:  # no step-exit state left them out (a float is never left out: only tensors are)
        return set(), set(), ""
    return set(), steps, (f"The probes after the step loop may read {', '.join(need.tail)}, which the step-exit "
                          f"states of {len(steps)} epochs left out: those epochs run their step loop")


def _describe(selected, segments, workers, touched, unit=None, own="") -> str:
    full = sum(m == "full" for s in segments for m in s.modes.values())
    skip = sum(m == "skip" for s in segments for m in s.modes.values())
    if unit == "iterations":
        run_on = sum(e > max(s.keep) for s in segments for e in s.modes)
        return (f"replay {len(selected)} iteration(s){own} as {len(segments)} segment(s) on {workers} worker(s): "
                f"{full} iteration(s) run" + (f", {run_on} of them past the last one asked for, to reach a "
                                              "recorded check of the state" if run_on else ""))
    why = touched.get("why") or (
        "the probes change the step loop" if touched["step"] else "the probes sit outside the step loop")
    return (f"replay {len(selected)} epoch(s){own} as {len(segments)} segment(s) on {workers} worker(s): "
            f"{full} epoch(s) in full, {skip} with the step loop skipped ({why})")


def _own_numbers(run: Run, selected) -> str:
    """For a loop such as ``for epoch in range(1, n + 1)``: " (numbered from 0: 3-4, where `epoch` = 4-5)",
    the numbers its own variable had (the ones its prints showed) beside flor_nb's; "" for other loops."""
    own = loop_values(run.state, selected)
    return f" (numbered from 0: {format_epochs(selected)}, where {own})" if own else ""


def blobs_of(run: Run):
    """The run's blob location when it is not the store's folder (a shared folder or a URL), else None."""
    blobs = run.env.get("blobs")
    return str(blobs) if blobs else None
