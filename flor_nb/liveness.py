"""Values a checkpoint between two iterations need not store: the loop body recomputes them before any read.

In a step-only loop (makemore: ``for i in range(max_steps): ix = ...; emb = C[Xtr[ix]]; h = ...; logits =
...; for p in parameters: p.grad = None; loss.backward(); ...``) the activations ``emb``, ``h`` and ``logits``
and the parameters' gradients are overwritten by the next iteration before anything reads them, yet they
are as big as the model. :func:`dead_at_unit_start` finds such values, syntactically and conservatively
(it answers "dead" only when every pass through the body assigns or clears them before any read), so
end-of-unit checkpoints can leave them out (their digests are still kept: replay checks them).

Replay runs the same analysis on the edited code (:func:`needs`): a probe that reads such a value first
makes it live, and the replay then starts from a checkpoint that kept it. Nothing is ever restored from
a checkpoint that lacks what the replayed code reads.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field

_ESCAPES = (ast.Break, ast.Continue, ast.Return, ast.Raise)
_DYNAMIC = {"globals", "locals", "vars", "eval", "exec", "__import__", "__dict__"}
_READS_GRADS = {"grad", "backward", "step", "zero_grad", "clip_grad_norm_", "clip_grad_value_", "getattr",
                "named_parameters", "grad_norm", "autograd"}
# A probe line before the clearing may call these and still not read gradients.
_SAFE_CALLS = {"log", "float", "int", "len", "round", "abs", "min", "max", "sum", "str", "bool", "item", "mean",
               "std", "norm", "detach", "cpu", "numpy", "tolist", "numel", "size", "float", "clone"}


@dataclass(frozen=True)
class Dead:
    """What every unit of the loop recomputes before reading it."""

    names: frozenset = frozenset()  # root variables the body assigns before any read
    cleared: tuple = ()  # ("list", name) | ("zero_grad", name): gradients cleared before any read
    clear_line: int | None = None  # line of the statement that clears them (for the probe check at replay)
    reasons: dict = field(default_factory=dict)  # why a candidate is not dead (for diagnostics)

    def __bool__(self):
        return bool(self.names or self.cleared)

    def to_json(self) -> dict:
        return {"names": sorted(self.names), "cleared": [list(c) for c in self.cleared], "clear_line": self.clear_line}

    @classmethod
    def from_json(cls, d: dict | None) -> "Dead":
        d = d or {}
        return cls(frozenset(d.get("names", ())), tuple(tuple(c) for c in d.get("cleared", ())), d.get("clear_line"))


def _loads(node) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _targets(stmt) -> set[str]:
    """Names an unconditional top-level assignment binds (``h = ...``, ``a, b = ...``)."""
    if isinstance(stmt, ast.Assign):
        targets = stmt.targets
    elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
        targets = [stmt.target]
    else:
        return set()
    out = set()
    for t in targets:
        elts = t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]
        if not all(isinstance(e, ast.Name) for e in elts):
            return set()  # x.attr = / x[i] = : not a plain binding
        out |= {e.id for e in elts}
    return out


def function_reads(sources) -> set[str] | None:
    """Global names read inside functions, lambdas and classes the given sources define (None: the code
    reaches the namespace dynamically, so nothing can be proven dead)."""
    out: set = set()
    for src in sources:
        try:
            tree = ast.parse(src)
        except SyntaxError:
            return None
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in _DYNAMIC:
                return None
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                out |= _loads(node)
    return out


def _words(node) -> set[str]:
    """Names and attribute names a node mentions."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
    return out


def _clearing(stmt):
    """("list", X) for ``for p in X: p.grad = None``; ("zero_grad", X) for ``X.zero_grad()`` (set_to_none,
    the default); else None."""
    if (isinstance(stmt, ast.For) and isinstance(stmt.target, ast.Name) and isinstance(stmt.iter, ast.Name)
            and not stmt.orelse and len(stmt.body) == 1 and isinstance(stmt.body[0], ast.Assign)):
        a = stmt.body[0]
        t = a.targets[0] if len(a.targets) == 1 else None
        if (isinstance(t, ast.Attribute) and t.attr == "grad" and isinstance(t.value, ast.Name)
                and t.value.id == stmt.target.id and isinstance(a.value, ast.Constant) and a.value.value is None):
            return ("list", stmt.iter.id)
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        c = stmt.value
        if (isinstance(c.func, ast.Attribute) and c.func.attr == "zero_grad" and isinstance(c.func.value, ast.Name)
                and not c.args and all(k.arg == "set_to_none" and isinstance(k.value, ast.Constant)
                                       and k.value.value is True for k in c.keywords)):
            return ("zero_grad", c.func.value.id)
    return None


def dead_at_unit_start(loop, reads_in_functions, library_call=None) -> Dead:
    """What the body of ``loop`` (an ``ast.For``) assigns or clears before any read, in every unit.

    ``reads_in_functions``: :func:`function_reads` of the cell and its dependency cells (None: give up).
    ``library_call(call) -> bool``: whether a call cannot read gradients (record time, with the namespace);
    without it, only calls in :data:`_SAFE_CALLS` are trusted.
    """
    if not isinstance(loop, ast.For) or loop.orelse or reads_in_functions is None:
        return Dead()
    if any(isinstance(n, ast.Name) and n.id in _DYNAMIC for n in ast.walk(loop)):
        return Dead()
    deleted = {t.id for n in ast.walk(loop) if isinstance(n, ast.Delete) for t in n.targets if isinstance(t, ast.Name)}
    read, assigned, escaped = set(), set(), False
    dead: set = set()
    cleared, clear_line, grads_read = [], None, False
    for stmt in loop.body:
        if escaped:
            break
        clear = _clearing(stmt)
        if clear is not None and not grads_read:
            cleared.append(clear)
            clear_line = stmt.lineno
            read |= _loads(stmt)  # the list's name, the optimizer's
            continue
        read |= _loads(stmt)
        if not grads_read:
            grads_read = _may_read_grads(stmt, library_call)
        for name in _targets(stmt) - read - assigned:
            if name not in reads_in_functions and name not in deleted:
                dead.add(name)
        assigned |= _targets(stmt)
        escaped = any(isinstance(n, _ESCAPES) for n in ast.walk(stmt))
    return Dead(frozenset(dead), tuple(cleared), clear_line)


def _may_read_grads(stmt, library_call) -> bool:
    if _words(stmt) & _READS_GRADS:
        return True
    for call in (n for n in ast.walk(stmt) if isinstance(n, ast.Call)):
        if library_call is not None:
            if not library_call(call):
                return True
        elif _call_name(call) not in _SAFE_CALLS:
            return True
    return False


def _call_name(call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def needs(recorded: Dead, loop, reads_in_functions, added_lines=()) -> tuple[set, bool]:
    """What the edited loop ``loop`` reads of what recording left out: (names, gradients?).

    ``added_lines``: line numbers of the edited cell that are probes (not recorded code).
    """
    if not recorded:
        return set(), False
    # Calls in the recorded statements were judged at record time, with the namespace: trusted here; the
    # probe lines before the clearing are checked below.
    now = dead_at_unit_start(loop, reads_in_functions, lambda call: True) if loop is not None else Dead()
    names = set(recorded.names - now.names)
    grads = False
    if recorded.cleared:
        if loop is None or tuple(now.cleared) != tuple(recorded.cleared):
            grads = True
        else:  # the recorded statements before the clearing were judged with the namespace: check the probes
            added = set(added_lines)
            for stmt in loop.body:
                if _clearing(stmt) is not None:
                    break
                lines = set(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
                if lines & added and _may_read_grads(stmt, None):
                    grads = True
                    break
    return names, grads


# -- record time: the loop in the cell, with the namespace to judge calls ---------------------------------
def for_record(code: str, choice: dict, sources, ns: dict) -> Dead:
    """:func:`dead_at_unit_start` for the recorded cell, once a unit has run (the body's names are bound)."""
    loop = _epoch_loop(code, choice)
    return dead_at_unit_start(loop, function_reads([code, *sources]), _judge(ns)) if loop is not None else Dead()


def for_replay(recorded: Dead, code: str, recorded_code: str, choice: dict, sources,
               edited=()) -> tuple[set, bool]:
    """:func:`needs` for an edited cell: what it reads first of what recording left out.

    ``edited``: sources of dependency cells edited for this replay. The calls before the clearing were
    judged with the recorded functions; an edited one that mentions gradients may now read them first."""
    from .edits import added_lines

    names, grads = needs(recorded, _epoch_loop(code, choice), function_reads([code, *sources]),
                         added_lines(recorded_code, code))
    if recorded.cleared and any(_words(ast.parse(src)) & _READS_GRADS for src in edited):
        grads = True
    return names, grads


def _epoch_loop(code: str, choice: dict):
    from .instrument import _find

    try:
        epoch = _find(ast.parse(code), "cell", hint=choice)[0]
    except Exception:  # noqa: BLE001 - no loop found: nothing is dead
        return None
    return epoch if isinstance(epoch, ast.For) else None


def _judge(ns: dict, depth: int = 3):
    """``library_call(call)``: True when the call cannot read gradients: torch, numpy and builtins, methods
    of tensors and arrays, and functions or modules of the notebook whose code (followed ``depth`` calls
    deep) names nothing that reads gradients."""
    import types

    import numpy as np
    import torch

    user = ns.get("__name__", "__main__")

    def safe(obj, d) -> bool:
        if isinstance(obj, (torch.Tensor, np.ndarray, types.ModuleType, types.BuiltinFunctionType,
                            int, float, str)):
            return getattr(obj, "__name__", "") != user
        if isinstance(obj, types.MethodType):
            return safe(obj.__func__, d)
        if isinstance(obj, types.FunctionType):
            if obj.__module__ != user:
                return True
            return d > 0 and _code_safe(obj.__code__, obj.__globals__, d)
        if isinstance(obj, type):
            return obj.__module__ != user or (d > 0 and all(
                _code_safe(f.__code__, getattr(f, "__globals__", ns), d) for f in vars(obj).values()
                if isinstance(f, types.FunctionType)))
        cls = type(obj)
        if cls.__module__ != user:  # an instance of a library class (nn.Linear, a tensor view)
            return not isinstance(obj, torch.optim.Optimizer)
        return safe(cls, d)

    def _code_safe(code, globs, d) -> bool:
        names = set(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                names |= set(const.co_names)
        if names & _READS_GRADS or names & _DYNAMIC:
            return False
        return all(safe(globs[n], d - 1) for n in names if n in globs and _is_user(globs[n]))

    def _is_user(obj) -> bool:
        mod = getattr(obj, "__module__", None) or getattr(type(obj), "__module__", None)
        return mod == user and not isinstance(obj, (int, float, str, bool, type(None)))

    def library_call(call) -> bool:
        f = call.func
        while isinstance(f, ast.Attribute):
            f = f.value
        if isinstance(f, ast.Call):
            return library_call(f)
        if not isinstance(f, ast.Name):
            return False
        obj = ns.get(f.id, __builtins__.get(f.id) if isinstance(__builtins__, dict) else getattr(__builtins__, f.id, None))
        if obj is None:
            return False
        if isinstance(call.func, ast.Attribute):
            target = obj
            for attr in _attr_chain(call.func)[:-1]:
                target = getattr(target, attr, None)
                if target is None:
                    return False
            if isinstance(target, (torch.Tensor, np.ndarray, types.ModuleType)):
                return getattr(target, "__name__", "") != user
            meth = getattr(target, _attr_chain(call.func)[-1], None)
            return meth is not None and safe(meth, depth)
        return safe(obj, depth)

    return library_call


def _attr_chain(node) -> list[str]:
    out = []
    while isinstance(node, ast.Attribute):
        out.append(node.attr)
        node = node.value
    return out[::-1]
