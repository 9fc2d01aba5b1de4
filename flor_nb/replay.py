"""Replay chosen epochs of a recorded run with new probes, and check the replay is faithful."""
from __future__ import annotations

import json
import time
import uuid
import warnings
from collections import defaultdict

import numpy as np
import pandas as pd

from . import executor as executors
from . import devices, hash_seed, housekeeping, runtime, signing
from .checkpoint import CorruptCheckpointError
from .errors import FlorError
from .instrument import recorded_loops
from .state import content_hash
from .store import Run, Store, get_store
from .cells import analyze
from .clock import clock_names
from .verdict import CAVEATS, FAITHFUL, check, verdict_text
from .replay_plan import blobs_of, intact_plan, prepare
from .worker import emit, run_segment

__all__ = ["prepare", "replay", "verdict_text"]


def replay(run, code=None, epochs=None, cells=None, workers=None, store=None, on_event=None,
           executor=None, iters=None, trust_store=False, device=None) -> pd.DataFrame:
    """Replay ``epochs`` of ``run`` with ``code`` (the edited cell); return the probes' values.

    The result has one row per (epoch, step, seq) with the probe columns and the
    recorded metrics beside them (``seq`` numbers repeats at one step); ``result.attrs["fidelity"]``
    says whether the recorded metrics were reproduced exactly. For a run whose loop counts
    iterations (a ``while`` loop, a step-only ``for``), ``iters="5000-5200"`` says the same as
    ``epochs``: the ``epoch`` column then numbers iterations. ``device``: where the recorded tensors go
    (``"cpu"``, ``"cuda:1"`` or a dict such as ``{"cuda:1": "cuda:0"}``; default: where they were recorded);
    across device types the verdict compares with a tolerance and says so (see :mod:`flor_nb.devices`).
    A damaged checkpoint is named and replay starts from the nearest earlier intact one
    (``fidelity["damaged_checkpoints"]``). A run whose cells and checkpoints are not signed with your key
    is refused unless ``trust_store=True`` (see :func:`flor_nb.trust`).
    """
    epochs = _units(epochs, iters)
    store = get_store(store)
    if trust_store:
        housekeeping.trust(store)
    run = store.find_run(run)
    signing.check_run(run, store.home)  # replay executes its cells: only if this user signed them
    devices.check_available(devices.DeviceMap(device))  # a device this machine lacks: refused before any work
    damaged: dict = {}  # epoch -> why its checkpoint cannot be used
    ex = executors.resolve(executor)
    slots = getattr(ex, "slots", None)
    p = prepare(store, run, code, epochs, cells, workers, slots=slots)
    # Workers tag their progress events with this token: unique, so a late event of an earlier replay on
    # the same warm workers (another store's replay 1, say) is never taken for this one's.
    token = uuid.uuid4().hex
    replay_id = store.create_replay(run.id, p["code"], p["edited_cells"], p["epochs"], _plan_row(p))
    started = time.perf_counter()
    cancelled = None
    events = None if on_event is None else _only(token, replay_id, on_event)
    while True:
        if on_event is not None:
            on_event({"replay": replay_id, "plan": [s.to_dict() for s in p["segments"]],
                      "epochs_to_run": p["epochs_to_run"], "workers": p["workers"],
                      "unit": recorded_loops(run.state).get("unit", "epochs")})
        try:
            results = ex.run(run_task, _tasks(store, run, p, token, device), events)
        except executors.ReplayCancelled as e:
            cancelled, results = e, [r for r in e.results if r is not None]
        except CorruptCheckpointError as e:
            if e.epoch is None or e.epoch in damaged:
                store.finish_replay(replay_id, "failed", time.perf_counter() - started, [], {"error": str(e)})
                raise
            # Route around the damage: plan again from the nearest earlier intact checkpoint.
            damaged[e.epoch] = str(e)
            warnings.warn(f"flor_nb: {e} Replaying from the nearest earlier intact checkpoint instead.", stacklevel=2)
            try:
                p = intact_plan(store, run, code, epochs, cells, workers, damaged, slots)
            except BaseException as again:
                store.finish_replay(replay_id, "failed", time.perf_counter() - started, [], {"error": str(again)})
                raise
            store.set_replay_plan(replay_id, _plan_row(p))
            continue
        except BaseException as e:
            store.finish_replay(replay_id, "failed", time.perf_counter() - started, [], {"error": str(e)})
            raise
        break
    duration = time.perf_counter() - started
    rows = [r for res in results for r in res["rows"]]
    modes = {int(e): m for res in results for e, m in res["modes"].items()}
    outside = any(res.get("tail_ran") or res.get("head_ran") for res in results)  # rows with no epoch
    recorded = store.logs([run.id], kind="recorded")
    recorded_names = {r["name"] for r in recorded}
    state = {**run.state, "clock_metrics": sorted(set(run.state.get("clock_metrics", ())) | clock_names(p["code"])[1]),
             "hash_cause": hash_seed.divergence_cause(run.env.get("hashseed"), [("the recorded cell", run.code)] + [
                 (f"In[{c['count']}]", c["source"]) for c in p["cells"]])}
    fidelity = check(_by_content(recorded, store.home), _by_content(rows, store.home), modes, results,
                     recorded_code=run.code, code=p["code"],
                     edited_cells=p["edited_cells"], run_state=state, outside=outside,
                     reads=sorted(set(_reads(p["code"])).union(*(r.get("roots", []) for r in results))))
    fidelity["kinds"] = run.state.get("objects") or {}
    fidelity["unit"] = recorded_loops(run.state).get("unit", "epochs")
    unchecked = fidelity["state"]["unchecked"]
    if unchecked:  # where a replay can run on to, to check them: the next unit whose end state was recorded
        fidelity["state"]["next_check"] = min((int(e) for e in p["end_digests"] if int(e) >= max(unchecked)),
                                              default=None)
    fidelity["writes"] = sorted({w for r in results for w in r.get("writes", [])})
    fidelity["removed"] = sorted({w for r in results for w in r.get("removed", [])} - set(fidelity["writes"]))
    fidelity["setup_output"] = next((r.get("setup_output") for r in results if r.get("setup_output")), "")
    probes = sorted({r[0] for r in rows} - recorded_names)
    keep = [r for r in rows if r[0] in probes]
    store.replace_hindsight(run.id, probes, sorted(modes) + ([None] if outside else []), keep, replay_id)
    fidelity["seconds"] = duration
    fidelity["timings"] = [{k: res[k] for k in ("segment", "setup_seconds", "restore_seconds", "epoch_seconds", "pid")}
                           for res in results]
    fidelity["plan"] = p["summary"]
    fidelity["modes"] = modes
    if p["tail_why"]:
        fidelity["tail"] = {"last": p["tail"], "ran": any(r.get("tail_ran") for r in results), "why": p["tail_why"]}
    if p["head"]:
        fidelity["head"] = {"ran": any(r.get("head_ran") for r in results),
                            "checked": any(r.get("head_checked") for r in results),
                            "differs": sorted({k for r in results for k in r.get("head_differs") or ()})}
    head = fidelity.get("head") or {}
    unsure = head.get("differs") or (head.get("ran") and not head["checked"])
    if (unsure or not (fidelity.get("tail") or {"ran": True})["ran"]) and fidelity["level"] == FAITHFUL:
        fidelity["level"] = CAVEATS  # a probe's values that may differ, or that are missing
    if cancelled is not None:
        _mark_cancelled(fidelity, p["epochs"], sorted(modes))
    if damaged:
        fidelity["damaged_checkpoints"] = {str(e): why for e, why in damaged.items()}
    store.finish_replay(replay_id, "cancelled" if cancelled else "finished", duration, probes, fidelity)
    frame = result_frame(run, recorded, rows, probes, sorted(modes) if cancelled else p["epochs"], fidelity, store,
                         outside=outside)
    if cancelled is not None:
        frame.attrs["cancelled"] = True
        cancelled.result = frame
        raise cancelled
    return frame


def _only(token, replay_id, on_event):
    """Pass on this replay's worker events only, with its replay id."""
    def handle(event):
        if event.get("replay") == token:
            on_event({**event, "replay": replay_id})
    return handle


def run_task(task: dict) -> dict:
    """One segment in a worker (:func:`flor_nb.worker.run_segment`), then an event saying its epochs are kept."""
    result = run_segment(task)
    emit({"replay": task["replay_id"], "segment_done": task["segment"]["first"], "kept": sorted(result["modes"])})
    return result


def _mark_cancelled(fidelity: dict, requested: list, kept: list):
    """A cancelled replay checked only the segments that finished: never a plain "faithful" verdict."""
    fidelity["cancelled"] = {"requested": list(requested), "kept": list(kept),
                             "lost": [e for e in requested if e not in set(kept)]}
    if fidelity.get("level") == FAITHFUL:
        fidelity["level"] = CAVEATS



def _plan_row(p) -> dict:
    return {"segments": [s.to_dict() for s in p["segments"]], "workers": p["workers"], "summary": p["summary"]}


def _tasks(store: Store, run: Run, p: dict, token: str, device=None) -> list[dict]:
    return [{
        "home": str(store.home), "blobs": blobs_of(run), "run_id": run.id, "label": run.label, "replay_id": token,
        "code": p["code"], "recorded_code": run.code, "loops": p["loops"], "cells": p["cells"], "args": run.args,
        "segment": seg.to_dict(), "threads": p["threads"],
        "tail": p["tail"] is not None and seg.last == p["tail"],  # then run the cell's lines after its loop
        "head": p["head"] and seg.first == 0,  # then keep what the lines before the loop log
        "start_digest": p["start_digest"] if p["head"] and seg.first == 0 else None,
        **{k: p[k] for k in ("step_paths", "step_digests", "resume_paths", "end_digests")},
        "scope": _scope_spec(run),
        "roots": run.state.get("roots") or [],
        "setup_digests": run.state.get("setup_digests"),  # None: recorded before they were kept
        "limits": run.state.get("limits"),
        "clock_attrs": run.state.get("clock_attrs") or {},
        "cwd": run.env.get("cwd"),
        "start_method": run.env.get("start_method"),
        "exclude": _unchecked_streams(run, p["code"]),
        "left_out_names": _left_out_names(run),
        "key": str(signing.key_path()),  # the worker verifies checkpoints with this user's key
        "device": devices.DeviceMap(device).to_json(),  # checked here: a bad device fails before workers start
        "gpu": run.env.get("gpu"),
    } for seg in p["segments"]]


def _by_content(rows, home):
    """Logged arrays compared by their content, not by where their files lie (recorded and replayed
    copies are different files); a recorded array without a stored hash is hashed from its file."""
    def key(text):
        value = runtime.from_json(text) if isinstance(text, str) and text.startswith("{") else None
        if not (isinstance(value, dict) and "__array__" in value):
            return text
        h = value.get("hash")
        if h is None:
            try:
                h = content_hash(np.load(home / value["__array__"], allow_pickle=False))
            except (OSError, ValueError):
                h = f"unreadable {value['__array__']}"
        return json.dumps({"__array__": h, "shape": value.get("shape"), "dtype": value.get("dtype")})

    if rows and isinstance(rows[0], dict):
        return [{**r, "value": key(r["value"])} for r in rows]
    return [(n, e, s, q, key(v)) for n, e, s, q, v in rows]


def _left_out_names(run: Run) -> list[str]:
    """Variables the next epoch recomputes first: where a skipped step loop's state left them out, the worker does
    not compare them (or the containers that held their tensors) at that epoch's end."""
    dead = run.state.get("dead") or {}
    return list(dead.get("names", [])) if dead.get("steps") else []


def _units(epochs, iters):
    if epochs is not None and iters is not None:
        raise FlorError(f"Give epochs ({epochs!r}) or iters ({iters!r}), not both: they both choose the loop's "
                        "passes to replay (iters reads better for an iteration loop).")
    return iters if iters is not None else epochs


def _unchecked_streams(run: Run, code: str) -> list[str]:
    """Streams recorded but not judged: wall-clock variables; variables of runs recorded by flor_nb 0.1."""
    clock = set(run.state.get("clock_vars", ())) | clock_names(code)[0]
    out = [f"var/{n}" for n in sorted(clock)]
    if run.state.get("capture", 1) < 2:  # 0.1 digested variables by their pickles: not comparable
        out.append("var/")
    out.append("vmeta")  # older runs digested every value tensor's meta as one stream: a probe's tensor changed it
    return out


def _reads(code: str) -> list[str]:
    free, assigned = analyze(code)
    return sorted(free | assigned)


def _scope_spec(run: Run) -> dict:
    spec = run.state.get("spec") or {}
    return {"only": set(spec["only"]) if spec.get("only") else None, "extra": set(spec.get("extra") or ())}


def result_frame(run, recorded, rows, probes, epochs, fidelity, store=None, outside=False) -> pd.DataFrame:
    """Wide frame: epoch, step, seq, each probe, and the recorded metrics of those epochs beside them.

    ``seq`` numbers the values logged under one name at one (epoch, step): a probe in a helper called
    per micro-batch gives rows with seq 0, 1, ...; most rows have seq 0. ``outside``: the cell's lines before or
    after its loop ran; what they logged is in rows with no epoch, last.
    """
    store = get_store(store)
    selected = set(epochs) | ({None} if outside else set())
    records = defaultdict(dict)
    for n, e, s, q, v in rows:
        if n in probes and e in selected:
            records[(e, s, q)][n] = store.decode(v)
    for r in recorded:
        if r["epoch"] in selected:
            records[(r["epoch"], r["step"], r["seq"])][r["name"]] = store.decode(r["value"])
    frame = pd.DataFrame(
        [{"epoch": e, "step": s, "seq": q, **vals} for (e, s, q), vals in sorted(records.items(), key=_order)]
    )
    if frame.empty:
        frame = pd.DataFrame(columns=["epoch", "step", "seq", *probes])
    cols = ["epoch", "step", "seq"] + [c for c in probes if c in frame] + sorted(
        c for c in frame.columns if c not in ("epoch", "step", "seq") and c not in probes)
    frame = frame[cols]
    frame["step"] = frame["step"].astype("Int64")
    frame["seq"] = frame["seq"].astype("int64")
    frame.attrs.update({"run": run.label, "epochs": epochs, "probes": probes, "fidelity": fidelity,
                        "verdict": verdict_text(fidelity)})
    return frame


def _order(item):
    (e, s, q), _ = item
    return (e is None, -1 if e is None else e, -1 if s is None else s, q)  # after the loop: last

