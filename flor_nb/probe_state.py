"""Values the probes change from one unit to the next, which no checkpoint holds.

A replay restores what training reads and changes from a checkpoint; a value only an added probe reads (a
validation loader with a generator of its own, an iterator over it, a list it appends to) is rebuilt by the
cells instead, as it was when recording started. A probe that changes such a value (draws a shuffled batch,
calls ``next()``, appends) would, in a run that had it from the start, have changed it in every earlier unit
too. A segment of the replay that starts past unit 0 lacks those changes: its probe values may not be that
run's. So the worker digests these values after its setup and again after its segment; a value that changed
in a segment starting past unit 0 is named, with the way to get exact values (replay from unit 0 in one
worker). Digests are cheap: tensors by their in-place version, generators by their state.
"""
from __future__ import annotations

import ast
import hashlib
import io
import logging
import time
import types

import numpy as np
import torch

from .capture import state_objects
from .cells import analyze
from .data_watch import signature
from .edits import added_lines
from .fingerprint import fingerprint
from .kinds import CODE
from .plan import format_epochs
from .roots import Scope, root_names
from .tensor_bytes import hash_tensor
from .hashing import DEFAULT
from .instrument import RUNTIME
from .setup_check import held_values, rng_types

logger = logging.getLogger(__name__)

BUDGET_S = 0.2  # per value and digest: one too large to walk in time is named as not watched
_SMALL = 4096  # tensors up to this many elements are digested by their bytes (a reduce may make them afresh)


class _TooLarge(Exception):
    pass


class Digest(str):
    """A digest; ``partial`` when it holds a generator or iterator whose place is not seen in full (a generator
    frame's locals and instruction are seen, not the loop it is suspended in)."""
    partial = False


def probe_names(recorded: str, code: str, cells=()) -> set[str]:
    """Names the lines a replay added read: to the recorded cell (``code`` against ``recorded``) and to the edited
    dependency cells (``cells``: dicts with ``source`` and, when edited, ``recorded_source``)."""
    out = set()
    for before, after in [(recorded, code)] + [(c["recorded_source"], c["source"]) for c in cells
                                               if c.get("recorded_source")]:
        lines = set(added_lines(before, after))
        try:
            tree = ast.parse(after)
        except SyntaxError:
            continue
        out |= _global_loads(tree, lines)
    return out


def _global_loads(tree: ast.AST, lines: set) -> set[str]:
    """Names loaded on ``lines`` that are not a local of the function (or comprehension) they are in: a probe in
    ``compute_loss(self, model, inputs)`` reading ``model`` reads its argument, not the cells' ``model``."""
    out = set()

    def local_names(fn) -> set:
        args = fn.args
        names = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
        names |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
        declared = set()
        for n in _own_nodes(fn):
            if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
                names.add(n.id)
            elif isinstance(n, (ast.Global, ast.Nonlocal)):
                declared |= set(n.names)
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(n.name)
        return names - declared

    def visit(node, scopes):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            scopes = scopes + [local_names(node)]
        elif isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            scopes = scopes + [{n.id for g in node.generators for n in ast.walk(g.target) if isinstance(n, ast.Name)}]
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and getattr(node, "lineno", 0) in lines:
            if not any(node.id in scope for scope in scopes):
                out.add(node.id)
        for child in ast.iter_child_nodes(node):
            visit(child, scopes)

    visit(tree, [])
    return out


def _own_nodes(fn):
    """The nodes of a function's body (a lambda's expression), not those of the functions and classes it defines."""
    stack = list(fn.body) if isinstance(fn.body, list) else [fn.body]
    while stack:
        n = stack.pop()
        yield n
        if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(n))


def watched(ns: dict, names: set, exclude, state_ids=()) -> list[str]:
    """The values in ``ns`` that ``names`` reach (through the functions they call too), but for ``exclude`` (the
    state, restored and checked; what the recorded code binds), the state's objects by another name
    (``state_ids``) and code without values of its own."""
    reach = root_names(ns, Scope(assigned=set(), free=set(names)))[0]
    out = []
    for name in sorted(reach - set(exclude)):
        value = ns[name]
        if name.startswith("_") or id(value) in state_ids or (isinstance(value, CODE) and not held_values(value)):
            continue
        out.append(name)
    return out


def digest(value, budget: float = BUDGET_S, state_ids=()) -> Digest | None:
    """A digest that changes when the value does, cheap to take twice in one process; None when too large.
    Objects of the state (``state_ids``: restored and checked on their own, changed by training) by a token.
    A Python generator is digested by its frame (code, instruction, locals), which a ``next()`` usually moves but
    not always (a loop over equal items): such a digest is marked ``partial``, as is an iterator that cannot be
    reduced to its position (only its type is seen)."""
    deadline = time.perf_counter() + budget
    partial = []

    def token(obj):
        if time.perf_counter() > deadline:
            raise _TooLarge
        if id(obj) in state_ids:
            return ("state",)
        if isinstance(obj, torch.Generator):
            return ("generator", hash_tensor(obj.get_state(), DEFAULT))
        if isinstance(obj, torch.Tensor):
            if obj.numel() <= _SMALL and obj.layout == torch.strided and obj.device.type == "cpu":
                return ("tensor", str(obj.dtype), tuple(obj.shape), hash_tensor(obj, DEFAULT))
            return ("tensor", str(obj.dtype), tuple(obj.shape), obj.data_ptr(), obj._version)
        if isinstance(obj, np.ndarray) and not obj.dtype.hasobject:  # a memmap of a whole corpus: not read through
            if obj.nbytes <= _SMALL * 256:
                return ("array", obj.dtype.str, obj.shape, hashlib.blake2b(np.ascontiguousarray(obj).data).hexdigest())
            return ("array", obj.dtype.str, obj.shape, obj.ctypes.data)
        if isinstance(obj, torch.utils.data.dataloader._BaseDataLoaderIter):
            return ("loader-iterator", id(obj), obj._num_yielded)
        if isinstance(obj, (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)):
            tok = _frame_token(obj, token)
            if tok[2] != "done":
                partial.append(obj)
            return tok
        if hasattr(type(obj), "__next__") and not _reducible(obj):
            if isinstance(obj, io.IOBase) and not obj.closed and obj.seekable():
                try:
                    return ("file", getattr(obj, "name", None), obj.tell())
                except OSError:  # a text file read by next(): its position is not told
                    pass
            partial.append(obj)
            return ("iterator", type(obj).__qualname__, id(obj))
        if isinstance(obj, torch.utils.data.Dataset):  # its size and tensors' versions, its own generators: not
            own = sorted((k, fingerprint(v, token)) for k, v in vars(obj).items() if isinstance(v, rng_types()))
            return ("dataset", type(obj).__qualname__, signature(obj), tuple(own))  # a walk of every sample
        return None

    held = held_values(value)
    try:
        out = Digest(fingerprint(held if held is not None else value, token))
        out.partial = bool(partial)
        return out
    except _TooLarge:
        return None
    except Exception as e:  # noqa: BLE001 - an object that cannot be walked is not watched, and says so
        logger.info("flor_nb: not watched: %s: %s", type(value).__name__, e)
        return None


def _frame_token(gen, token) -> tuple:
    """A generator (or coroutine) by its code, the instruction it is suspended at and its locals; what it
    delegates to (``yield from``) by its own digest."""
    frame = getattr(gen, "gi_frame", None) or getattr(gen, "cr_frame", None) or getattr(gen, "ag_frame", None)
    code = getattr(gen, "__qualname__", type(gen).__qualname__)
    if frame is None:
        return ("generator", code, "done")
    inner = getattr(gen, "gi_yieldfrom", None) or getattr(gen, "cr_await", None)
    return ("generator", code, frame.f_lasti, fingerprint(dict(frame.f_locals), token),
            fingerprint(inner, token) if inner is not None else None)


def _reducible(obj) -> bool:
    try:
        obj.__reduce_ex__(4)
        return True
    except Exception:  # noqa: BLE001 - an iterator that cannot be reduced: its position is not seen
        return False


class Watch:
    """The probes' values, digested after the setup and compared after the segment."""

    def __init__(self, ns: dict, names: list[str], graph=None, state_ids=None):
        """``graph``, ``state_ids``: the state's walk and objects (capture.state_objects); the graph is kept so
        the ids stay those of its objects."""
        state_ids = state_ids or {}
        self.ns, self.graph, self.state_ids = ns, graph, state_ids
        self.start = {}
        for n in names:  # one whose digest moves by itself (a value made afresh at each walk) is not watched
            first = digest(ns[n], state_ids=state_ids)
            self.start[n] = first if first is not None and digest(ns[n], state_ids=state_ids) == first else None

    def changed(self) -> dict:
        """{name: "changed"} for values the segment changed, {name: "unwatched"} for those too large to watch,
        {name: "partial"} for unchanged ones holding a generator or iterator whose place is not seen in full."""
        out = {}
        for name, was in self.start.items():
            if was is None:
                out[name] = "unwatched"
            elif name not in self.ns or digest(self.ns[name], state_ids=self.state_ids) != was:
                out[name] = "changed"
            elif was.partial:
                out[name] = "partial"
        return out


def for_segment(ns: dict, recorded: str, code: str, cells, roots, limits: dict) -> Watch | None:
    """The watch of a replay segment that starts past unit 0 (None when the added lines read nothing to watch):
    the values the lines added to ``code`` and ``cells`` read, but for the recording's state (``roots``: restored
    and checked), what the recorded code binds, and code."""
    names = probe_names(recorded, code, cells)
    if not names:
        return None
    exclude = set(roots) | analyze(recorded)[1] | {"flor", RUNTIME}
    graph, state_ids = state_objects(ns, roots, **limits)
    found = watched(ns, names, exclude, state_ids)
    return Watch(ns, found, graph, state_ids) if found else None


def describe(changed: dict, starts: list[int], epochs: list[int], unit: str = "epoch") -> str:
    """The verdict's sentences: ``changed`` {name: "changed"|"unwatched"|"partial"} in segments that started at
    ``starts`` (units past 0) and replayed ``epochs``."""
    if not changed or not starts:
        return ""
    units = f"{unit}{'s' if len(epochs) > 1 else ''} {format_epochs(epochs)}"
    out = ""
    moved = sorted(n for n, w in changed.items() if w == "changed")
    if moved:
        one = len(moved) == 1
        out += (f". NOT necessarily what a run with these probes from the start would have logged in {units}: the "
                f"probes change {', '.join(moved)} from one {unit} to the next (a generator they draw from, an "
                f"iterator they advance, a list they append to), which training does not, so no checkpoint holds "
                f"{'it' if one else 'them'}; the replay started at {unit}{'s' if len(starts) > 1 else ''} "
                f"{', '.join(map(str, starts))} from "
                f"{'its' if one else 'their'} value as the cells made {'it' if one else 'them'}, without the changes "
                f"the probes would have made in the {unit}s before")
    unsure = sorted(n for n, w in changed.items() if w == "unwatched")
    if unsure:
        out += _may_differ("Not watched (too large to digest)", unsure, "",
                           f"change {{it}} from one {unit} to the next", units)
    part = sorted(n for n, w in changed.items() if w == "partial")
    if part:
        its, they = ("its", "it is") if len(part) == 1 else ("their", "they are")
        out += _may_differ("Not seen in full", part, f" (a generator or iterator: flor_nb sees {its} local values, not "
                           f"where {they} in a loop)", "advance {it}", units,
                           f", which had advanced {{it}} in the earlier {unit}s too")
    flag = "--iters" if unit == "iteration" else "--epochs"
    return out + f". Replay {flag} 0-{max(epochs)} --workers 1 for exact values"


def _may_differ(lead: str, names: list, aside: str, act: str, units: str, since: str = "") -> str:
    """One sentence of :func:`describe` for values the watch could not vouch for; ``{it}`` in ``act`` and
    ``since`` becomes "it" or "them"."""
    it = "it" if len(names) == 1 else "them"
    return (f". {lead}, read by the probes: {', '.join(names)}{aside}; if the probes {act.format(it=it)}, the values "
            f"of {units} may differ from a run with the probes from the start{since.format(it=it)}")
