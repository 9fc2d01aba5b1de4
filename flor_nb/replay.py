"""Replay chosen epochs of a recorded run with new probes, and check the replay is faithful."""
from __future__ import annotations

import os
import time
from collections import defaultdict

import pandas as pd

from . import executor as executors
from . import runtime
from .errors import FlorError
from .instrument import instrument, parse
from .plan import parse_epochs, plan
from .store import Run, Store
from .worker import SERIOUS, run_segment


def prepare(store: Store, run: Run, code=None, epochs=None, cells=None, workers=None) -> dict:
    """Validate a replay request and plan it, without running anything (the widget's estimate)."""
    code = run.code if code is None else code
    instrument(code, what="replayed cell")  # syntax errors and missing loops, pointed at their line
    deps = [dict(c) for c in run.deps]
    for count, source in (cells or {}).items():
        match = [c for c in deps if c["count"] == int(count)]
        if not match:
            known = ", ".join(f"In[{c['count']}]" for c in deps) or "none"
            raise FlorError(f"Cell In[{count}] is not a dependency of {run.label} (its cells: {known}).")
        parse(source, what=f"edited cell In[{count}]")
        match[0]["source"] = source
    selected = parse_epochs(epochs, run.epochs_completed, run.label)
    ckpts = store.checkpoints(run.id)
    # Float reductions depend on the thread count: replay with the recorded one, so results are
    # bit-exact, and by default start only as many workers as the cores allow at that count.
    threads = int(run.env.get("threads") or 1)
    workers = workers or max(1, min((os.cpu_count() or 1) // threads, len(selected)))
    segments = plan(selected, set(ckpts), workers, run.label)
    per_epoch = run.timings.get("epoch_seconds") or []
    mean = sum(per_epoch) / len(per_epoch) if per_epoch else None
    run_epochs = sum(len(s.epochs) for s in segments)
    workers = min(workers, len(segments))
    return {
        "code": code,
        "cells": deps,
        "edited_cells": {int(k): v for k, v in (cells or {}).items()},
        "epochs": selected,
        "segments": segments,
        "workers": workers,
        "threads": threads,
        "checkpoints": {str(b): r["path"] for b, r in ckpts.items()},
        "digests": {str(b): runtime.from_json(r["digest"]) for b, r in ckpts.items()},
        "estimate_seconds": None if mean is None else mean * run_epochs / max(workers, 1),
        "epochs_to_run": run_epochs,
    }


def replay(run, code=None, epochs=None, cells=None, workers=None, store=None, on_event=None,
           executor=None) -> pd.DataFrame:
    """Replay ``epochs`` of ``run`` with ``code`` (the edited cell); return the probes' values.

    The result has one row per (epoch, step) with the probe columns and the
    recorded metrics beside them; ``result.attrs["fidelity"]`` says whether the
    recorded metrics were reproduced exactly.
    """
    from .api import get_store

    store = get_store(store)
    run = store.find_run(run)
    p = prepare(store, run, code, epochs, cells, workers)
    replay_id = store.create_replay(run.id, p["code"], p["edited_cells"], p["epochs"],
                                    {"segments": [s.to_dict() for s in p["segments"]], "workers": p["workers"]})
    tasks = [{
        "home": str(store.home), "run_id": run.id, "label": run.label, "replay_id": replay_id,
        "code": p["code"], "cells": p["cells"], "args": run.args,
        "segment": seg.to_dict(), "checkpoints": p["checkpoints"], "digests": p["digests"],
        "scope": _scope_spec(run),
    } for seg in p["segments"]]
    ex = executor or executors.local(p["workers"], p["threads"])
    started = time.perf_counter()
    if on_event is not None:
        on_event({"replay": replay_id, "plan": [s.to_dict() for s in p["segments"]],
                  "epochs_to_run": p["epochs_to_run"], "workers": p["workers"]})
    try:
        results = ex.run(run_segment, tasks, on_event)
    except BaseException:
        store.finish_replay(replay_id, "failed", time.perf_counter() - started, [], {})
        raise
    duration = time.perf_counter() - started
    rows = [r for res in results for r in res["rows"]]
    ran = sorted({e for res in results for e in range(res["segment"]["start"], res["segment"]["end"] + 1)})
    recorded = store.logs([run.id], kind="recorded")
    recorded_names = {r["name"] for r in recorded}
    fidelity = check(recorded, rows, ran, results)
    probes = sorted({r[0] for r in rows} - recorded_names)
    keep = [r for r in rows if r[0] in probes]
    store.replace_hindsight(run.id, probes, ran, keep, replay_id)
    fidelity["seconds"] = duration
    fidelity["timings"] = [{k: res[k] for k in ("segment", "setup_seconds", "restore_seconds", "epoch_seconds", "pid")}
                           for res in results]
    store.finish_replay(replay_id, "finished", duration, probes, fidelity)
    return result_frame(run, recorded, rows, probes, p["epochs"], fidelity)


def _scope_spec(run: Run) -> dict:
    spec = run.state.get("spec") or {}
    return {"only": set(spec["only"]) if spec.get("only") else None, "extra": set(spec.get("extra") or ())}


def check(recorded, rows, ran, results) -> dict:
    """Compare recorded metrics with their re-computed values, per metric; and the state digests."""
    ran_set = set(ran)
    want = {(r["name"], r["epoch"], r["step"], r["seq"]): runtime.from_json(r["value"])
            for r in recorded if r["epoch"] in ran_set}
    got = {(n, e, s, q): runtime.from_json(v) for n, e, s, q, v in rows}
    metrics = {}
    by_name = defaultdict(list)
    for key in want:
        by_name[key[0]].append(key)
    for name, keys in sorted(by_name.items()):
        n_exact, missing, max_diff, first_bad = 0, 0, 0.0, None
        for key in keys:
            if key not in got:
                missing += 1
                continue
            a, b = want[key], got[key]
            if runtime.same(a, b):
                n_exact += 1
            else:
                d = runtime.abs_diff(a, b)
                max_diff = max(max_diff, d if d is not None else float("inf"))
                if first_bad is None:
                    first_bad = {"epoch": key[1], "step": key[2], "recorded": a, "replayed": b}
        verdict = "exact" if n_exact == len(keys) else ("missing" if missing == len(keys) else "diverged")
        metrics[name] = {"compared": len(keys), "exact": n_exact, "missing": missing,
                         "max_abs_diff": max_diff, "verdict": verdict, "first_mismatch": first_bad}
    divergence = {}
    for res in results:
        for epoch, d in res["divergence"].items():
            divergence[int(epoch)] = d
    state_changed = {e: [k for k in d["differ"] + d["missing"] if k.startswith(SERIOUS)]
                     for e, d in divergence.items()}
    state_changed = {e: ks for e, ks in state_changed.items() if ks}
    faithful = all(m["verdict"] == "exact" for m in metrics.values() if m["verdict"] != "missing") and not state_changed
    return {"faithful": faithful, "metrics": metrics, "state_diverged": state_changed,
            "variables_differ": {e: [k for k in d["differ"] if k.startswith("var/")] for e, d in divergence.items()},
            "epochs": ran}


def verdict_text(fidelity: dict) -> str:
    """One line a user can read: did the replay reproduce the recording?"""
    parts = []
    for name, m in fidelity["metrics"].items():
        if m["verdict"] == "exact":
            parts.append(f"{name} exact ({m['compared']} values)")
        elif m["verdict"] == "missing":
            parts.append(f"{name} not logged in the replayed code")
        else:
            parts.append(f"{name} DIVERGED ({m['compared'] - m['exact'] - m['missing']} of {m['compared']} differ, "
                         f"max abs diff {m['max_abs_diff']:.3g})")
    head = "Faithful replay: recorded metrics reproduced exactly" if fidelity["faithful"] else "Replay NOT faithful"
    out = f"{head}: " + ("; ".join(parts) if parts else "no recorded metric in these epochs")
    if fidelity["state_diverged"]:
        epochs = ", ".join(str(e) for e in sorted(fidelity["state_diverged"]))
        keys = sorted({k for ks in fidelity["state_diverged"].values() for k in ks})
        out += (f". Training state differs from the recording after epoch(s) {epochs} ({', '.join(keys[:5])}): "
                "a probe changed training (it mutated the model, optimizer or consumed random numbers). "
                "Make the probe read-only, e.g. wrap it in torch.no_grad() and avoid RNG calls")
    return out + "."


def result_frame(run, recorded, rows, probes, epochs, fidelity) -> pd.DataFrame:
    """Wide frame: epoch, step, each probe, and the recorded metrics of those epochs beside them."""
    selected = set(epochs)
    records = defaultdict(dict)
    for n, e, s, q, v in rows:
        if n in probes and e in selected:
            records[(e, s)][n] = _value(run, v)
    for r in recorded:
        if r["epoch"] in selected:
            records[(r["epoch"], r["step"])][r["name"]] = _value(run, r["value"])
    frame = pd.DataFrame(
        [{"epoch": e, "step": s, **vals} for (e, s), vals in sorted(records.items(), key=_order)]
    )
    if frame.empty:
        frame = pd.DataFrame(columns=["epoch", "step", *probes])
    cols = ["epoch", "step"] + [c for c in probes if c in frame] + sorted(
        c for c in frame.columns if c not in ("epoch", "step") and c not in probes)
    frame = frame[cols]
    frame["step"] = frame["step"].astype("Int64")
    frame.attrs.update({"run": run.label, "epochs": epochs, "probes": probes, "fidelity": fidelity,
                        "verdict": verdict_text(fidelity)})
    return frame


def _order(item):
    (e, s), _ = item
    return (e, -1 if s is None else s)


def _value(run, text):
    from .api import decode_value

    return decode_value(text)
