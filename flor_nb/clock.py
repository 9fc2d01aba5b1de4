"""Which names in a cell hold wall-clock values: they differ in every run, so they are not compared.

``t0 = time.time()``, ``dt = t1 - t0``, ``running_mfu = 0.9 * running_mfu + 0.1 * mfu(dt)``: a replay
can never reproduce these, so the verdict lists them as not compared instead of calling the
replay unfaithful. Found by taint: a value computed from a clock call, or from a tainted name.
"""
from __future__ import annotations

import ast
import inspect
import os
import sys
import textwrap
import types

_CLOCK_ATTRS = {"time", "perf_counter", "monotonic", "process_time", "time_ns", "perf_counter_ns",
                "monotonic_ns", "process_time_ns", "thread_time", "thread_time_ns", "default_timer",
                "now", "utcnow", "today"}
_CLOCK_MODULES = {"time", "datetime", "timeit", "date"}
_BARE = {"perf_counter", "monotonic", "process_time", "time_ns", "perf_counter_ns", "default_timer"}


def _root(expr):
    while isinstance(expr, ast.Attribute):
        expr = expr.value
    return expr.id if isinstance(expr, ast.Name) else None


def _is_clock_call(node, bare: set) -> bool:
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    if isinstance(f, ast.Attribute):
        return f.attr in _CLOCK_ATTRS and _root(f.value) in _CLOCK_MODULES
    return isinstance(f, ast.Name) and f.id in bare


def _tainted(expr, names: set, bare: set) -> bool:
    return any(_is_clock_call(n, bare) or (isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id in names)
               for n in ast.walk(expr))


def _targets(node):
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign, ast.NamedExpr)):
        targets = [node.target]
    else:
        return []
    return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]


def clock_names(source: str) -> tuple[set[str], set[str]]:
    """(variables holding clock-derived values, names logged with clock-derived values) in ``source``."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set(), set()
    bare = set(_BARE)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("time", "timeit"):
            bare |= {a.asname or a.name for a in node.names if a.name in _CLOCK_ATTRS}
    assigns = [n for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.NamedExpr))]
    names: set[str] = set()
    changed = True
    while changed:
        changed = False
        for node in assigns:
            value = node.value if node.value is not None else None
            if value is None:
                continue
            hit = _tainted(value, names, bare) or (isinstance(node, ast.AugAssign) and set(_targets(node)) & names)
            new = set(_targets(node)) - names if hit else set()
            if new:
                names |= new
                changed = True
    logged = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "log"
                and len(node.args) >= 2 and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str) and _tainted(node.args[1], names, bare)):
            logged.add(node.args[0].value)
    return names, logged


# -- attributes of objects: ``self.iter_time = time.time()`` in a trainer class (minGPT's Trainer) -----------
def _users(klass) -> bool:
    """Whether ``klass`` is the user's: defined in the notebook (or a script) or in a file under the working
    directory (minGPT's ``mingpt/trainer.py`` beside the notebook). Installed libraries are not read: reading
    their sources costs time on the training thread, and their trainers have adapters (frameworks.py)."""
    if klass.__module__ in ("__main__", "builtins"):  # builtins: a class exec'd in a dict without __name__
        return True
    path = getattr(sys.modules.get(klass.__module__), "__file__", None) or ""
    return path.startswith(os.getcwd() + os.sep) and "-packages" + os.sep not in path
CLOCK = "<wall clock>"  # what a clock attribute digests as: its presence is compared, its value is not


def _self_attr(node, me: str):
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == me:
        return node.attr
    return None


def _functions(klass):
    for v in vars(klass).values():
        if isinstance(v, (staticmethod, classmethod)):
            v = v.__func__
        elif isinstance(v, property):
            v = v.fset
        if isinstance(v, types.FunctionType):
            yield v


def _methods(cls):
    """(first argument name, function node) of each method of ``cls`` and its bases whose source is known:
    a file's, or a notebook cell's (kept in linecache by IPython)."""
    for klass in cls.__mro__:
        if not _users(klass):
            continue
        for fn in _functions(klass):
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
            except (OSError, TypeError, SyntaxError, IndentationError):
                continue
            node = tree.body[0] if tree.body else None
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.args.args:
                yield node.args.args[0].arg, node


def attrs_of(cls) -> frozenset:
    """Attributes that methods of ``cls`` set from the wall clock: ``self.t = time.time()``, and what is
    computed from them (``self.dt = now - self.t``). Found in the class's source, if it has one."""
    methods = list(_methods(cls))
    attrs: set[str] = set()
    changed = True
    while changed:
        changed = False
        for me, fn in methods:
            names: set[str] = set()  # clock-derived locals of this method
            assigns = [n for n in ast.walk(fn) if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign))]
            for _ in range(len(assigns) + 1):
                grew = False
                for node in assigns:
                    if node.value is None:
                        continue
                    hit = _tainted(node.value, names, _BARE) or any(
                        _self_attr(n, me) in attrs for n in ast.walk(node.value))
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for t in targets:
                        for n in ast.walk(t):
                            a = _self_attr(n, me)
                            if hit and a is not None and a not in attrs:
                                attrs.add(a)
                                changed = grew = True
                            if hit and isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store) and n.id not in names:
                                names.add(n.id)
                                grew = True
                if not grew:
                    break
    return frozenset(attrs)


class ClockAttrs:
    """Type -> its clock attributes, for digests (``fingerprint(..., skip=)``). A recording analyzes each
    type it meets and stores what it found (:meth:`found`); a replay uses exactly that, so both digest alike."""

    def __init__(self, recorded: dict | None = None, analyze: bool = True):
        self.known = {k: frozenset(v) for k, v in (recorded or {}).items()}
        self.analyze = analyze
        self._by_type: dict = {}

    def __call__(self, t) -> frozenset:
        hit = self._by_type.get(t)
        if hit is None:
            name = f"{t.__module__}.{t.__qualname__}"
            hit = self.known.get(name)
            if hit is None:
                hit = attrs_of(t) if self.analyze and _users(t) else frozenset()
                if hit:
                    self.known[name] = hit
            self._by_type[t] = hit
        return hit

    def found(self) -> dict:
        return {k: sorted(v) for k, v in sorted(self.known.items()) if v}
