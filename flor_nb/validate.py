"""Check what users pass in before anything runs: each bad value gets an error naming it, what is accepted, the fix.

Record checks its arguments before the run is created (so no ``running`` row is
left behind); ``flor.log`` and ``flor.arg`` check their values at the call, so
a bad value stops the cell at the line that logged it and nothing recorded is lost.
"""
from __future__ import annotations

import json
import math
import numbers
import re

import numpy as np

from .errors import InputError

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_NAME_RULE = ("letters, digits, '_', '-' and '.', starting with a letter, digit or '_', at most 100 characters "
              "('@' separates the version: NAME@VERSION)")


def run_name(name) -> str:
    """A run name that is safe as a folder name inside the store."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InputError(f"Run name {name!r} is not allowed: use {_NAME_RULE}, e.g. --name digits_v2.")
    return name


def overhead(value) -> float:
    """The checkpoint time budget: a fraction of training time > 0 (``inf``: every epoch)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if isinstance(value, bool) or not v > 0:  # also rejects NaN
        raise InputError(f"--overhead {value!r} is not allowed: give the checkpoint time budget as a fraction of "
                         "training time above 0, e.g. 0.02 (2%), or inf to checkpoint every epoch.")
    return v


def workers(value) -> int | None:
    """A worker count: None (as many as the CPUs allow) or an integer >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InputError(f"--workers {value!r} is not allowed: give a whole number of replay worker processes, "
                         "1 or more, or leave it out to use as many as the CPUs allow.")
    return int(value)


def log_name(name) -> str:
    if not isinstance(name, str) or not name:
        raise InputError(f"flor.log got the name {name!r} ({type(name).__name__}): a logged value's name must be "
                         "a non-empty string, e.g. flor.log('loss', loss.item()).")
    return name


def log_value(name, value):
    """A container logged with flor.log must be storable as JSON (string keys): say which part is not."""
    if isinstance(value, np.ndarray) and value.dtype.hasobject:
        raise InputError(f"flor.log({name!r}, ...) cannot store an array of Python objects (dtype object): "
                         "arrays are kept as .npy files of numbers. Log a numeric array, or a list.")
    if isinstance(value, (dict, list, tuple)):
        bad = _unstorable(value)
        if bad is not None:
            raise InputError(f"flor.log({name!r}, ...) cannot store {bad}. Logged containers are kept as JSON: "
                             "dict keys must be str, int, float, bool or None. Convert it first, e.g. "
                             "{str(k): v for k, v in value.items()}.")
    return value


def _unstorable(value, depth=0):
    """A description of the first part of ``value`` JSON cannot hold as a key, or None."""
    if depth > 100:
        return "a value nested more than 100 levels deep"
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                return f"the dict key {k!r} of type {type(k).__name__}"
            bad = _unstorable(v, depth + 1)
            if bad is not None:
                return bad
    elif isinstance(value, (list, tuple)):
        for v in value:
            bad = _unstorable(v, depth + 1)
            if bad is not None:
                return bad
    return None


def arg_value(name, value):
    """The form of a ``flor.arg`` value the store keeps: JSON, numpy scalars tagged with their dtype."""
    if not isinstance(name, str) or not name:
        raise InputError(f"flor.arg got the name {name!r}: a hyperparameter's name must be a non-empty string, "
                         "e.g. flor.arg('lr', 0.01).")
    if isinstance(value, np.generic) and value.dtype.kind in "biufc":
        item = value.item()
        if isinstance(item, complex):
            item = [item.real, item.imag]
        return {"__numpy__": str(value.dtype), "value": item}
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise InputError(f"flor.arg({name!r}, ...) cannot keep a {type(value).__name__} ({e}). A hyperparameter "
                         "must be a number (numpy scalars too), string, bool, None, or a list or dict of those. "
                         f"Pass the setting that builds it, e.g. flor.arg('hidden', 64).") from None
    return value


def arg_live(stored):
    """The value a stored ``flor.arg`` gives back in replay: numpy scalars come back as the same dtype."""
    if isinstance(stored, dict) and set(stored) == {"__numpy__", "value"}:
        dtype = np.dtype(stored["__numpy__"])
        v = stored["value"]
        return dtype.type(complex(*v) if dtype.kind == "c" and isinstance(v, list) else v)
    return stored
