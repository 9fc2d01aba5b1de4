"""Find a cell's ``trainer.train()`` / ``trainer.fit(...)`` call and route it through the runtime.

``trainer.train(resume_from_checkpoint=ckpt)`` becomes
``__flor__.fit(trainer, "train", resume_from_checkpoint=ckpt)`` on the same lines, so tracebacks
point at the user's line. At record time the receiver is looked up in the namespace (a
``transformers.Trainer`` or a Lightning ``Trainer``, subclasses too); the run stores the call it
chose (``{"kind", "call", "nth"}``) so replay finds it again in the edited cell by its text.
"""
from __future__ import annotations

import ast

from ..paths import resolve
from ..errors import NoLoopError
from . import METHODS, NAMES, framework_of

_BLOCKS = (ast.For, ast.AsyncFor, ast.While, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def fit_calls(tree: ast.Module) -> list[tuple[ast.stmt, ast.Call]]:
    """Statements ``X.train(...)`` / ``X.fit(...)`` (or ``out = X.fit(...)``) at the cell's top level,
    including inside top-level ``with``/``try``/``if`` blocks, never inside loops or functions."""
    out = []

    def visit(stmts):
        for s in stmts:
            if isinstance(s, _BLOCKS):
                continue
            value = getattr(s, "value", None) if isinstance(s, (ast.Expr, ast.Assign, ast.AnnAssign)) else None
            if (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)
                    and value.func.attr in METHODS.values()):
                out.append((s, value))
            for field in ("body", "orelse", "finalbody"):
                visit(getattr(s, field, None) or [])
            for handler in getattr(s, "handlers", None) or []:
                visit(handler.body)

    visit(tree.body)
    return out


def header(call: ast.Call) -> str:
    """``trainer.train`` for ``trainer.train(resume_from_checkpoint=...)``: how replay finds the call again."""
    return ast.unparse(call.func)


def _receiver(expr, ns):
    if ns is None:
        return None
    try:
        return resolve(ns, ast.unparse(expr))
    except (LookupError, Exception):  # noqa: BLE001 - an expression we cannot look up is not a trainer
        return None


def _built_in_cell(tree, stmt, receiver, ns) -> str | None:
    """``trainer = Trainer(...)`` earlier in the same cell: the framework of the class it calls."""
    if ns is None or not isinstance(receiver, ast.Name):
        return None
    found = None
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and node.lineno < stmt.lineno and isinstance(node.value, ast.Call)
                and any(isinstance(t, ast.Name) and t.id == receiver.id for t in node.targets)):
            found = framework_of(_receiver(node.value.func, ns), is_class=True) or found
    return found


def choose(tree: ast.Module, hint: dict | None, ns: dict | None, what: str):
    """The call to route, as ``(stmt, call, choice)``, or None when the cell trains with its own loop.

    ``hint``: a run's loop choice; with a ``framework`` entry, the recorded call must be in the cell.
    """
    calls = fit_calls(tree)
    want = (hint or {}).get("framework")
    if want:
        same = [(s, c) for s, c in calls if header(c) == want["call"]]
        if not same:
            raise NoLoopError(
                f"The recorded call `{want['call']}(...)` is not at the top level of this {what}, so there is "
                f"no {NAMES[want['kind']]} run to replay. Keep the call as recorded (probes go in the "
                "methods, callbacks and helpers it runs).")
        s, c = same[want["nth"]] if want["nth"] < len(same) else same[0]
        return s, c, want
    if hint:  # a run recorded with loops
        return None
    for s, c in calls:
        name = framework_of(_receiver(c.func.value, ns)) or _built_in_cell(tree, s, c.func.value, ns)
        if name and c.func.attr == METHODS[name]:
            h = header(c)
            nth = [header(x) for _, x in calls].index(h) if h else 0
            return s, c, {"kind": name, "call": h, "nth": nth}
    return None


def route(stmt: ast.stmt, call: ast.Call, runtime: str):
    """Rewrite ``X.m(a, k=v)`` into ``<runtime>.fit(X, "m", a, k=v)`` in place (same lines)."""
    new = ast.Call(
        func=ast.Attribute(value=ast.Name(id=runtime, ctx=ast.Load()), attr="fit", ctx=ast.Load()),
        args=[call.func.value, ast.Constant(call.func.attr), *call.args],
        keywords=call.keywords,
    )
    stmt.value = ast.copy_location(new, call)
