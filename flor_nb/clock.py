"""Which names in a cell hold wall-clock values: they differ in every run, so they are not compared.

``t0 = time.time()``, ``dt = t1 - t0``, ``running_mfu = 0.9 * running_mfu + 0.1 * mfu(dt)``: a replay
can never reproduce these, so the verdict lists them as not compared instead of calling the
replay unfaithful. Found by taint: a value computed from a clock call, or from a tainted name.
"""
from __future__ import annotations

import ast

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
