"""Read-side API: runs, logs and checkpoints as pandas DataFrames."""
from __future__ import annotations

import warnings
from datetime import datetime

import numpy as np
import pandas as pd

from . import disk, runtime
from .errors import DamagedValueWarning, StoreError
from .store import Run, Store, default_home
from .validate import arg_live

_stores: dict = {}


def get_store(store=None) -> Store:
    """The Store for ``store`` (a Store, a path, or None for ``$FLOR_NB_HOME`` / ``./.flor``)."""
    if isinstance(store, Store):
        return store
    home = str(store or default_home())
    if home not in _stores:
        _stores[home] = Store(home)
    return _stores[home]


def get_run(run, store=None) -> Run:
    """The stored :class:`~flor_nb.store.Run` for ``NAME`` or ``NAME@VERSION``."""
    return get_store(store).find_run(run)


def runs(store=None) -> pd.DataFrame:
    """One row per run version: name, version, status, started, duration, epochs, hyperparameters."""
    st = get_store(store)
    rows = []
    for r in st.all_runs():
        ckpts = st.checkpoints(r.id)
        row = {
            "name": r.name,
            "version": r.version,
            "status": r.status,
            "started": datetime.fromtimestamp(r.started).replace(microsecond=0),
            "duration_s": None if r.duration is None else round(r.duration, 2),
            "epochs": r.epochs_completed,
            "checkpoints": len(ckpts),
            "cells": ", ".join(f"In[{c['count']}]" for c in r.deps),
            "not_captured": ", ".join(sorted(r.state.get("not_captured") or {})),
        }
        row.update({f"arg.{k}": arg_live(v) for k, v in r.args.items()})
        rows.append(row)
    cols = ["name", "version", "status", "started", "duration_s", "epochs", "checkpoints", "cells", "not_captured"]
    return pd.DataFrame(rows, columns=cols + sorted({c for row in rows for c in row} - set(cols)))


def decode_value(text, store=None):
    """A stored log value as Python: a number, a JSON value, or an array artifact loaded from disk.

    An array whose file fails its content hash is reported and given as None, never returned."""
    value = runtime.from_json(text)
    if isinstance(value, dict) and "__array__" in value:
        from .state import content_hash

        try:
            path = disk.inside(get_store(store).home, value["__array__"])
            if not path.exists():
                return value
            array = np.load(path, allow_pickle=False)
            if value.get("hash") in (None, content_hash(array)):
                return array
            why = "its content hash does not match"
        except (OSError, ValueError, StoreError) as e:
            why = f"it does not load ({type(e).__name__}: {e})"
        warnings.warn(f"flor_nb: the logged array {value['__array__']} is damaged ({why}); it is left out. "
                      "Replay its epoch to recompute it.", DamagedValueWarning, stacklevel=2)
        return None
    return value


def dataframe(*names, run=None, store=None) -> pd.DataFrame:
    """Wide: one row per (name, version, epoch, step, seq), one column per logged name.

    Recorded and hindsight values sit together. ``run`` is ``NAME`` (all its
    versions), ``NAME@VERSION``, or None (every run). ``step`` is empty for
    epoch-level values. ``seq`` numbers the values logged under one name at one
    (epoch, step) (a probe called per micro-batch): every value is kept.
    """
    st = get_store(store)
    if run is None:
        selected = st.all_runs()
    elif "@" in str(run):
        selected = [st.find_run(run)]
    else:
        st.find_run(run)  # raises with the known runs if the name is unknown
        selected = [r for r in st.all_runs() if r.name == str(run)]
    by_id = {r.id: r for r in selected}
    rows: dict = {}
    for r in st.logs(by_id, names=list(names) or None):
        run_ = by_id[r["run_id"]]
        key = (run_.name, run_.version, r["epoch"], r["step"], r["seq"])
        rows.setdefault(key, {})[r["name"]] = decode_value(r["value"], st)
    keys = ["name", "version", "epoch", "step", "seq"]
    records = [dict(zip(keys, k), **v) for k, v in rows.items()]
    value_cols = list(names) or sorted({c for rec in records for c in rec} - set(keys))
    frame = pd.DataFrame(records, columns=[*keys, *value_cols])
    for col in ("epoch", "step"):
        frame[col] = frame[col].astype("Int64")
    frame["seq"] = frame["seq"].astype("int64")
    return frame.sort_values(keys, na_position="first", kind="stable").reset_index(drop=True)


def checkpoints(run, store=None) -> pd.DataFrame:
    """A run's checkpoints: the epoch each was taken in (-1: before the loop), where in it
    (``start``, ``step`` at the step loop's exit, ``end``), bytes new on disk and bytes of the whole state."""
    st = get_store(store)
    r = st.find_run(run)
    cols = ["epoch", "kind", "bytes", "logical_bytes", "path"]
    return pd.DataFrame([{c: row[c] for c in cols} for row in st.checkpoints(r.id).values()], columns=cols)


def replays(run, store=None) -> list[dict]:
    """Every replay of a run: probe code, epochs, probes and fidelity verdict."""
    st = get_store(store)
    return st.replays(st.find_run(run).id)


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
    return (f"flor_nb: {run.status} {run.label}: {run.epochs_completed} epochs{dur}, "
            f"{len(ckpts)} checkpoints ({size / 1e6:.1f} MB), store {st.home}")
