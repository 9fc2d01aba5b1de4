"""Did a replay's re-run cells rebuild what the recording had, for the values its probes read?

A replay restores the recorded cell's state (its roots) from a checkpoint. Every other value the
dependency cells bind it rebuilds by running those cells again, in another process. That gives the
recording's value only if the cells compute the same thing there: not when one draws from an unseeded
RNG (torch seeds itself at random in each process: ``random_split`` without a generator, a held-out
batch from ``torch.randn``), or reads a file that changed since. A probe reading such a value would be
silently wrong. So record digests, by content, what the dependency cells bound beyond the state, and
a replay whose code reads one of them digests it again after its setup and compares.

DataLoaders and Datasets in the state are rebuilt the same way (their generators and samplers are state,
restored from the checkpoint): their data is digested too, without their generators, and compared when
the replayed code reads them. One too large to digest in time is not named: what training reads of it is
checked by the verdict's state comparison.
"""
from __future__ import annotations

import logging
import sys
import time
import types
from collections import defaultdict

import numpy as np
import torch

from .cells import analyze, strip_shell
from .fingerprint import fingerprint
from .kinds import CODE
from .roots import Scope, root_names
from .hashing import DEFAULT
from .tensor_bytes import hash_tensor

logger = logging.getLogger(__name__)

# Record spends at most this long digesting, once per recorded cell (a list of 50k tensors takes ~0.5 s; a
# 200 MB tensor ~20 ms). Values left when it runs out are not digested: a replay reading one says it could not
# compare it.
BUDGET_S = 0.25
MAX_ARRAY_BYTES = 256 << 20  # a numpy array larger than this (a np.memmap of a whole corpus) is not hashed


class _TooLarge(Exception):
    pass


def digest(value, deadline: float = float("inf"), rngs: bool = True, named=None, rows: bool = False) -> str | None:
    """A content digest of ``value``, equal in any process for equal values (tensors by their bytes); None when
    it is still walking at ``deadline`` (``time.perf_counter()``). ``rngs=False``: random generators inside it
    are left out (their state is restored from a checkpoint, so a rebuilt one may differ). ``named``: {id: name}
    of objects digested by their name only (the state's, restored from a checkpoint). ``rows``: long lists of
    short rows of numbers at C speed (fingerprint's ``rows``; digests of kind "v2")."""
    def token(obj):
        if time.perf_counter() > deadline:
            raise _TooLarge
        if named and id(obj) in named:
            return ("state", named[id(obj)])
        if isinstance(obj, torch.Tensor):
            return ("tensor", str(obj.dtype), tuple(obj.shape), hash_tensor(obj, DEFAULT))
        if isinstance(obj, np.ndarray) and obj.nbytes > MAX_ARRAY_BYTES:  # a memmap of a corpus: not read through
            raise _TooLarge
        if not rngs and isinstance(obj, rng_types()):
            return ("rng", type(obj).__name__)
        return None

    try:
        return fingerprint(value, token, rows=(named or {}) if rows else None)
    except _TooLarge:
        return None
    except Exception as e:  # noqa: BLE001 - an object that cannot be walked is not compared, and says so
        logger.info("flor_nb: not digested: %s: %s", type(value).__name__, e)
        return None


def rng_types() -> tuple:
    import random

    np = sys.modules.get("numpy")
    return (torch.Generator, random.Random) + ((np.random.RandomState, np.random.Generator) if np else ())


def data_digest(value, deadline: float = float("inf")) -> str | None:
    """The digest of what a DataLoader (its dataset) or a Dataset holds, generators left out; None for anything
    else, or when it is too large to digest by ``deadline``."""
    if isinstance(value, torch.utils.data.DataLoader):
        value = value.dataset
    elif not isinstance(value, torch.utils.data.Dataset):
        return None
    return digest(value, deadline, rngs=False)


def closure_values(fn) -> list:
    """What each variable of ``fn``'s closure holds now (None: not bound yet)."""
    out = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            out.append(cell.cell_contents)
        except ValueError:  # not bound yet
            out.append(None)
    return out


def held_values(fn) -> tuple | None:
    """(defaults, keyword defaults, closure values) of a function (or a method's function) that holds any, else
    None."""
    if not callable(fn) or not hasattr(fn, "__code__"):
        return None
    held = (getattr(fn, "__defaults__", None), getattr(fn, "__kwdefaults__", None), closure_values(fn))
    return held if any(held) else None


def fn_digest(fn, named=None, deadline: float = float("inf")) -> str | None:
    """The digest of the values a function holds (its defaults, the variables its closure captured: ``def
    evaluate(m, data=Xv)``, ``make_eval(Xv)``), the state's objects by name; None when it holds none or is too
    large to digest by ``deadline``."""
    held = held_values(fn) if isinstance(fn, types.FunctionType) else None
    return None if held is None else digest(held, deadline, rngs=False, named=named)


def _state_ids(ns: dict, roots) -> dict:
    return {id(ns[n]): n for n in roots if n in ns}


def _bound(ns: dict, cells: list[dict]) -> dict:
    """{name: In[n] of the last cell that binds it} for the public names ``cells`` bound that ``ns`` holds."""
    out = {}
    for cell in cells:
        try:
            bound = analyze(strip_shell(cell["source"]))[1] | set(cell.get("bound") or ())
        except SyntaxError:
            continue
        out.update({n: cell["count"] for n in bound if n in ns and not n.startswith("_")})
    return out


def _rebuilt(ns: dict, cells: list[dict], roots=()) -> dict:
    """{name: In[n] of the cell that binds it} for the values (not code) that ``cells`` bound beyond ``roots``."""
    return {n: c for n, c in _bound(ns, cells).items() if n not in roots and not isinstance(ns[n], CODE)}


def record_digests(ns: dict, deps: list[dict], roots: set) -> dict:
    """{name: [In[n] that binds it, digest or None]}: what the dependency cells bound beyond the state."""
    t0 = time.perf_counter()
    deadline = t0 + BUDGET_S
    bound = sorted(_bound(ns, deps).items())
    state = _state_ids(ns, roots)
    # First the state's DataLoaders and Datasets (their data), then the other values, then what functions hold.
    out = {name: [count, data_digest(ns[name], deadline), "data"] for name, count in bound
           if name in roots and isinstance(ns[name], (torch.utils.data.DataLoader, torch.utils.data.Dataset))}
    # "v": the state's objects inside (or aliased by) a value are digested by their name, as in a replay they are
    # the restored ones (``raw_model = model`` of a compiled model: dynamo's caches are no content); "v2": and long
    # lists of rows of numbers at C speed (makemore's 20k contexts: 38 ms -> 3 ms at the start of every recording)
    out.update({name: [count, digest(ns[name], deadline, named=state, rows=True), "v2"] for name, count in bound
                if name not in roots and not isinstance(ns[name], CODE)})
    for name, count in bound:
        held = fn_digest(ns[name], state, deadline)  # None for anything but a function holding values
        if held is not None:
            out[name] = [count, held, "fn"]
    logger.info("flor_nb: %d values of the dependency cells digested in %.3f s", len(out), time.perf_counter() - t0)
    return out


def compare(ns: dict, code: str, recorded: dict | None, roots, cells=()) -> dict:
    """{name: why} for each value the replayed ``code`` reads (itself or through the functions it calls) that
    the re-run cells rebuilt differently from the recording (why starts "differs") or that could not be compared
    (why starts "not compared"). ``recorded`` None: a run recorded before these digests were kept; what it reads
    of what ``cells`` bound is named as not compared."""
    if recorded is None:
        recorded = {n: [count, "old"] for n, count in _rebuilt(ns, cells).items()}
    if not recorded:
        return {}
    free, assigned = analyze(code)
    reads = root_names(ns, Scope(assigned=assigned, free=free))[0]
    out = {}
    state = _state_ids(ns, roots)
    for name in sorted(reads & set(recorded)):
        count, was, *kind = recorded[name]
        if kind == ["data"]:
            if was is not None and data_digest(ns[name]) != was:
                out[name] = (f"differs: re-running In[{count}] made this data other than the recording's: an "
                             "unseeded random split or draw, or a file changed since")
            continue
        if kind == ["fn"]:
            if was is not None and fn_digest(ns[name], state) != was:
                out[name] = (f"differs: re-running In[{count}] made {name}() hold other values than the recording's "
                             "(its defaults or the variables it closes over): an unseeded random draw, or a file "
                             "changed since")
            continue
        if name in roots:
            continue
        if was == "old":
            out[name] = (f"not compared: rebuilt by re-running In[{count}]; this run was recorded before flor_nb "
                         "kept what to compare it with")
        elif was is None:
            out[name] = (f"not compared: rebuilt by re-running In[{count}]; too large to digest within record's "
                         "time budget")
        elif digest(ns[name], named=state if kind in (["v"], ["v2"]) else None, rows=kind == ["v2"]) != was:
            # a run recorded before "v": all by content; before "v2": rows one by one
            out[name] = (f"differs: re-running In[{count}] gave another value than the recording's: an unseeded "
                         "random draw, a file changed since, or a cell a replay does not run that changed it")
    return out


def describe(rebuilt: dict) -> str:
    """The verdict's sentences on what :func:`compare` found ("" when nothing)."""
    out = ""
    differs = {n: w.partition(": ")[2] for n, w in rebuilt.items() if w.startswith("differs")}
    if differs:
        one = len(differs) == 1
        keep = [n for n, w in differs.items() if "this data" not in w and "closes over" not in w]  # not state
        out += (f". NOT the recording's value, read by the replayed code: {'; '.join(_grouped(differs))}. Values "
                f"computed from {'it' if one else 'them'} differ from what a run with these probes would have logged; "
                f"seed the cell that makes {'it' if one else 'them'}" + (
                    f", or keep {'it' if len(keep) == 1 else 'them'} with --state +{',+'.join(keep)}," if keep else
                    " and keep the files it reads unchanged,") + " in the next recording")
    unsure = {n: w.partition(": ")[2] for n, w in rebuilt.items() if not w.startswith("differs")}
    if unsure:
        out += (f". Not compared with the recording, read by the replayed code: {'; '.join(_grouped(unsure))}. "
                f"Values that depend on {'it' if len(unsure) == 1 else 'them'} may differ from the recording")
    return out


def _grouped(why: dict, most=6) -> list[str]:
    """["a, b (why)", ...]: names that share a reason, named together."""
    by = defaultdict(list)
    for name, w in why.items():
        by[w].append(name)
    return [f"{', '.join(names[:most])}{' ...' if len(names) > most else ''} ({w})" for w, names in by.items()]
