"""Read-side API: runs, logs, checkpoints and replays as pandas DataFrames, and what a replay would do."""
from __future__ import annotations

import difflib
from datetime import datetime

import pandas as pd

from . import executor as executors, housekeeping, plan
from .errors import FlorError
from .probe_check import edited_code
from .instrument import recorded_loops
from .probes import Probe, in_step_loop
from .replay import prepare
from .store import Run, get_store
from .validate import arg_live
from .verdict import verdict_text

__all__ = ["get_store", "get_run", "runs", "dataframe", "checkpoints", "replays", "recorded", "last_result",
           "estimate", "du", "decode_value", "not_captured", "summary"]


class UnknownNameError(FlorError):
    """No value was logged under the requested name."""


def get_run(run, store=None) -> Run:
    """The stored :class:`~flor_nb.store.Run` for ``NAME`` or ``NAME@VERSION``."""
    return get_store(store).find_run(run)


def runs(store=None) -> pd.DataFrame:
    """One row per run version: name, version, status, started, duration, epochs, size on disk,
    dependency cells, what could not be captured, hyperparameters (``arg.*``) and the last recorded
    value of each scalar metric (``last.*``).

    ``size_mb`` counts every blob the run's checkpoints refer to (blobs are shared between runs);
    ``frees_mb`` is what deleting the run would free.
    """
    st = get_store(store)
    usage = {u.run.id: u for u in housekeeping.usage(st).runs}
    last = _last_values(st)
    rows = []
    for r in st.all_runs():
        ckpts = st.checkpoints(r.id)
        u = usage.get(r.id)
        row = {
            "name": r.name,
            "version": r.version,
            "status": r.status,
            "started": datetime.fromtimestamp(r.started).replace(microsecond=0),
            "duration_s": None if r.duration is None else round(r.duration, 2),
            "epochs": r.epochs_completed,
            "checkpoints": len(ckpts),
            "size_mb": round(u.size / 1e6, 2) if u else None,
            "frees_mb": round(u.unique / 1e6, 2) if u else None,
            "cells": cells_label(r),
            "not_captured": ", ".join(sorted(r.state.get("not_captured") or {})),
        }
        row.update({f"arg.{k}": arg_live(v) for k, v in r.args.items()})
        row.update({f"last.{k}": v for k, v in last.get(r.id, {}).items()})
        rows.append(row)
    cols = ["name", "version", "status", "started", "duration_s", "epochs", "checkpoints", "size_mb", "frees_mb",
            "cells", "not_captured"]
    extra = sorted({c for row in rows for c in row} - set(cols), key=lambda c: (not c.startswith("arg."), c))
    return pd.DataFrame(rows, columns=cols + extra)


def _last_values(st) -> dict:
    """{run_id: {metric: last recorded scalar}}."""
    last: dict = {}
    for r in st.logs(None, kind="recorded"):
        last.setdefault(r["run_id"], {})[r["name"]] = r["value"]
    out: dict = {}
    for run_id, values in last.items():
        for metric, text in values.items():
            v = st.decode(text)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(run_id, {})[metric] = v
    return out


def cells_label(run: Run) -> str:
    """The run's dependency cells, by their In[] numbers in the kernel that recorded them."""
    if not run.deps:
        return "none"
    return ", ".join(f"In[{c['count']}]" for c in run.deps) + " (recording kernel)"


def decode_value(text, store=None):
    """A stored log value as Python: a number, a JSON value, or an array artifact loaded from disk."""
    return get_store(store).decode(text)


def dataframe(*names, run=None, store=None) -> pd.DataFrame:
    """Wide: one row per (name, version, epoch, step, seq), one column per logged name.

    Recorded and hindsight values sit together. ``run`` is ``NAME`` (all its
    versions; also ``NAME@all``), ``NAME@VERSION``, or None (every run). ``step`` is empty for
    epoch-level values. ``seq`` numbers the values logged under one name at one
    (epoch, step) (a probe called per micro-batch): every value is kept. A name
    that was never logged raises :class:`UnknownNameError` naming the close ones.
    """
    st = get_store(store)
    if run is None:
        selected = st.all_runs()
    elif "@" in str(run) and not str(run).endswith("@all"):
        selected = [st.find_run(run)]
    else:
        name = str(run).removesuffix("@all")
        st.find_run(name)  # raises with the known runs if the name is unknown
        selected = [r for r in st.all_runs() if r.name == name]
    by_id = {r.id: r for r in selected}
    rows: dict = {}
    found = set()
    for r in st.logs(by_id, names=list(names) or None):
        run_ = by_id[r["run_id"]]
        found.add(r["name"])
        key = (run_.name, run_.version, r["epoch"], r["step"], r["seq"])
        rows.setdefault(key, {})[r["name"]] = st.decode(r["value"])
    missing = [n for n in names if n not in found]
    if missing:
        _unknown_names(st, missing, by_id, run)
    keys = ["name", "version", "epoch", "step", "seq"]
    records = [dict(zip(keys, k), **v) for k, v in rows.items()]
    value_cols = list(names) or sorted({c for rec in records for c in rec} - set(keys))
    frame = pd.DataFrame(records, columns=[*keys, *value_cols])
    for col in ("epoch", "step"):
        frame[col] = frame[col].astype("Int64")
    frame["seq"] = frame["seq"].astype("int64")
    return frame.sort_values(keys, na_position="first", kind="stable").reset_index(drop=True)


def _unknown_names(st, missing, by_id, run):
    known = sorted({r["name"] for r in st.logs(by_id)})
    where = f"run {run}" if run is not None else "any run"
    hints = []
    for name in missing:
        close = difflib.get_close_matches(name, known, n=1)
        if close:
            hints.append(f"did you mean {close[0]!r} for {name!r}?")
    listed = ", ".join(known) if known else "none yet"
    raise UnknownNameError(
        f"No values logged as {', '.join(map(repr, missing))} in {where}. Logged names: {listed}. "
        + (" ".join(hints).capitalize() + " " if hints else "")
        + "Log a new name in hindsight with flor.log inside a replay.")


def checkpoints(run, store=None) -> pd.DataFrame:
    """A run's checkpoints: the epoch each was taken in (-1: before the loop), where in it
    (``start``, ``step`` after the epoch's last step, ``end``), bytes new on disk and bytes of the whole state."""
    st = get_store(store)
    r = st.find_run(run)
    cols = ["epoch", "kind", "bytes", "logical_bytes", "path"]
    return pd.DataFrame([{c: row[c] for c in cols} for row in st.checkpoints(r.id).values()], columns=cols)


def replays(run, store=None) -> list[dict]:
    """Every replay of a run: probe code, epochs, probes and fidelity verdict."""
    st = get_store(store)
    return st.replays(st.find_run(run).id)


def recorded(run, store=None) -> pd.DataFrame:
    """The run's recorded values, long: one row per (name, epoch, step, seq) with a ``value``."""
    st = get_store(store)
    run = st.find_run(run)
    rows = [{"name": r["name"], "epoch": r["epoch"], "step": r["step"], "seq": r["seq"],
             "value": st.decode(r["value"])} for r in st.logs([run.id], kind="recorded")]
    return pd.DataFrame(rows, columns=["name", "epoch", "step", "seq", "value"])


def last_result(run, store=None):
    """The result frame of ``run``'s latest replay that kept values, rebuilt from the store; None if none.

    Same shape as :func:`flor_nb.replay`'s result: epoch, step, the probes, the
    recorded metrics, and ``attrs`` with the fidelity and its verdict. A cancelled
    replay counts when some of its epochs finished; ``attrs["cancelled"]`` says so.
    """
    st = get_store(store)
    run = st.find_run(run)
    done = [r for r in st.replays(run.id) if r["status"] == "finished"
            or (r["status"] == "cancelled" and (r["fidelity"].get("cancelled") or {}).get("kept"))]
    if not done:
        return None
    last = done[-1]
    fidelity = last["fidelity"]
    epochs = (fidelity.get("cancelled") or {}).get("kept") or last["epochs"]
    probes_ = list(last["probes"])
    metrics = sorted({r["name"] for r in st.logs([run.id], kind="recorded")})
    frame = dataframe(*probes_, *[m for m in metrics if m not in probes_], run=run.label, store=st)
    # what lines before or after the loop logged (no epoch), when that replay ran them
    outside = any((fidelity.get(k) or {}).get("ran") for k in ("head", "tail"))
    frame = frame[frame["epoch"].isin(epochs) | (frame["epoch"].isna() & outside)].drop(columns=["name", "version"])
    frame = frame.dropna(how="all", subset=[c for c in frame.columns if c not in ("epoch", "step", "seq")])
    frame = frame.reset_index(drop=True)
    if frame["epoch"].notna().all():
        frame["epoch"] = frame["epoch"].astype(int)
    frame.attrs.update({"run": run.label, "epochs": epochs, "probes": probes_, "fidelity": fidelity,
                        "verdict": verdict_text(fidelity), "code": last["code"], "replay": last["id"]})
    if last["status"] == "cancelled":
        frame.attrs["cancelled"] = True
    return frame


def estimate(run, probes: list[Probe], epochs=None, workers=None, store=None, executor=None) -> dict:
    """What a replay of ``epochs`` with ``probes`` will do and how long it should take (runs nothing).

    See :func:`flor_nb.plan.estimate`; raises :class:`~flor_nb.probe_check.ProbeError` for bad probes.
    ``executor`` as in :func:`flor_nb.replay`: a cluster's workers, not this machine's cores, bound the plan.
    """
    st = get_store(store)
    run = st.find_run(run)
    prepared = prepare(st, run, edited_code(run, probes), epochs, None, workers, slots=executors.slots(executor))
    inside = [p.title for p, yes in zip(probes, in_step_loop(run, probes)) if yes]
    return plan.estimate(run, prepared, inside)


def du(store=None) -> pd.DataFrame:
    """The store's disk use: one row per run (size, what deleting it frees), then unreferenced blobs,
    the database, the full-disk reserve and the total. ``attrs`` holds the byte counts."""
    u = housekeeping.usage(store)
    rows = [{"what": x.run.label, "status": x.run.status, "size": housekeeping.format_bytes(x.size),
             "frees": housekeeping.format_bytes(x.unique), "bytes": x.size} for x in u.runs]
    rows.append({"what": "unreferenced blobs (flor.gc() frees them)", "status": "", "size":
                 housekeeping.format_bytes(u.unreferenced), "frees": housekeeping.format_bytes(u.unreferenced),
                 "bytes": u.unreferenced})
    rows.append({"what": "database", "status": "", "size": housekeeping.format_bytes(u.database), "frees": "",
                 "bytes": u.database})
    if u.reserve:  # a small store's total is mostly this: say what it is
        rows.append({"what": "reserve kept for a full disk (released when the disk fills)", "status": "",
                     "size": housekeeping.format_bytes(u.reserve), "frees": "", "bytes": u.reserve})
    rows.append({"what": f"total ({u.home})", "status": "", "size": housekeeping.format_bytes(u.total), "frees": "",
                 "bytes": u.total})
    frame = pd.DataFrame(rows, columns=["what", "status", "size", "frees", "bytes"])
    frame.attrs.update({"total": u.total, "unreferenced": u.unreferenced, "home": str(u.home)})
    return frame


def not_captured(run, store=None) -> str | None:
    """A sentence listing what the run's checkpoints could not capture, and why; None when nothing."""
    r = run if isinstance(run, Run) else get_run(run, store)
    missing = r.state.get("not_captured") or {}
    if not missing:
        return None
    listed = "; ".join(f"{path} ({why})" for path, why in sorted(missing.items()))
    return (f"Not captured in {r.label}: {listed}. Replays rebuild {'it' if len(missing) == 1 else 'these'} from "
            "the recorded cells instead of restoring the recorded state, and say so when the replayed code reads "
            f"{'it' if len(missing) == 1 else 'them'}.")


def summary(run: Run, store=None) -> str:
    """One line after a record: name@version, epochs, checkpoints kept, store path."""
    st = get_store(store)
    ckpts = st.checkpoints(run.id)
    size = sum(c["bytes"] for c in ckpts.values())
    dur = f" in {run.duration:.1f}s" if run.duration is not None else ""
    unit = "iterations" if recorded_loops(run.state).get("unit") == "iterations" else "epochs"
    n = run.epochs_completed or 0
    own = plan.loop_values(run.state, range(n)) if n else ""
    return (f"flor_nb: {run.status} {run.label}: {n} {unit[:-1] if n == 1 else unit}{dur}"
            + (f" (numbered 0-{n - 1} in replays; {own} in the loop)" if own else "")
            + f", {len(ckpts)} checkpoints ({size / 1e6:.1f} MB), store {st.home}")
