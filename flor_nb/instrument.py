"""Find the epoch and step loops of a training cell and wrap them with ``flor.loop``.

The cell's first top-level ``for`` is the epoch loop and the first ``for`` nested
in its body is the step loop, unless the user marked them with ``flor.loop``.
Wrapping keeps every line number, so tracebacks point at the user's lines.
"""
from __future__ import annotations

import ast
import difflib
from dataclasses import dataclass

from .errors import NoLoopError, ProbeSyntaxError

RUNTIME = "__flor__"  # name the instrumented code uses for the flor_nb module


@dataclass
class Loops:
    epoch_line: int
    step_line: int | None
    epoch_explicit: bool
    step_explicit: bool


def parse(source: str, what: str = "cell") -> ast.Module:
    """Parse user code; a syntax error names the line and shows it."""
    try:
        return ast.parse(source)
    except SyntaxError as e:
        line = (e.text or "").rstrip("\n")
        caret = " " * max((e.offset or 1) - 1, 0) + "^"
        raise ProbeSyntaxError(
            f"Syntax error in the {what} at line {e.lineno}: {e.msg}\n    {line}\n    {caret}\n"
            "Fix that line and run again.",
            e.lineno,
            line,
        ) from None


def _loop_marker(node) -> str | None:
    """'epoch' / 'step' when ``node`` is ``flor.loop("epoch", ...)``-like."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "loop"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    ):
        return node.args[0].value
    return None


def _fors(stmts, into_loops=False):
    """For statements in order, looking into if/with/try blocks (and loops if asked)."""
    for stmt in stmts:
        if isinstance(stmt, (ast.For, ast.AsyncFor)):
            yield stmt
            if not into_loops:
                continue
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(stmt, (ast.While,)) and not into_loops:
            continue
        for field in ("body", "orelse", "finalbody"):
            yield from _fors(getattr(stmt, field, []) or [], into_loops)
        for handler in getattr(stmt, "handlers", []) or []:
            yield from _fors(handler.body, into_loops)


def _wrap(loop: ast.For, kind: str):
    call = ast.Call(
        func=ast.Attribute(value=ast.Name(id=RUNTIME, ctx=ast.Load()), attr="loop", ctx=ast.Load()),
        args=[ast.Constant(kind), loop.iter],
        keywords=[],
    )
    loop.iter = ast.copy_location(call, loop.iter)


def _find(tree: ast.Module, what: str):
    """(epoch loop, step loop or None, epoch explicit, step explicit)."""
    all_fors = list(_fors(tree.body, into_loops=True))
    epoch = next((f for f in all_fors if _loop_marker(f.iter) == "epoch"), None)
    explicit = epoch is not None
    if epoch is None:
        epoch = next(iter(_fors(tree.body)), None)
    if epoch is None:
        raise NoLoopError(
            f"This {what} has no for loop, so there are no epochs to checkpoint. "
            "Put the training loop in the cell (for epoch in range(EPOCHS): ...) "
            "or mark it with `for epoch in flor.loop('epoch', range(EPOCHS)):`."
        )
    inner = list(_fors(epoch.body, into_loops=True))
    step = next((f for f in inner if _loop_marker(f.iter) == "step"), None)
    step_explicit = step is not None
    if step is None:
        step = inner[0] if inner else None
    return epoch, step, explicit, step_explicit


def instrument(source: str, what: str = "cell") -> tuple[ast.Module, Loops]:
    """Return the cell's AST with its loops wrapped, and where they are."""
    tree = parse(source, what)
    epoch, step, explicit, step_explicit = _find(tree, what)
    if not explicit:
        _wrap(epoch, "epoch")
    if step is not None and not step_explicit:
        _wrap(step, "step")
    ast.fix_missing_locations(tree)
    return tree, Loops(epoch.lineno, step.lineno if step else None, explicit, step_explicit)


def changes(recorded: str, edited: str) -> dict:
    """Where the edit touches the epoch body: ``step`` (the step loop), ``pre`` (before it).

    ``pre`` is also true when code before the step loop logs anything: its values need
    the true state at the epoch start, so such an epoch cannot be replayed on its own.
    """
    tree = parse(edited, "replayed cell")
    epoch, step, _, _ = _find(tree, "replayed cell")
    if step is None:
        return {"step": True, "pre": True}
    lines = set()
    sm = difflib.SequenceMatcher(a=recorded.splitlines(), b=edited.splitlines(), autojunk=False)
    for op, _, _, j1, j2 in sm.get_opcodes():
        if op != "equal":
            lines.update(range(j1 + 1, j2 + 1) if j2 > j1 else (j1, j1 + 1))
    body_start = epoch.body[0].lineno
    pre_stmts = [s for s in epoch.body if s.end_lineno < step.lineno]
    logs_before = any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "log"
        for s in pre_stmts for n in ast.walk(s)
    )
    edited_lines = edited.splitlines()
    # A hook registered anywhere fires inside the step loop: the step loop must run.
    hooks = any("register_" in edited_lines[ln - 1] and "hook" in edited_lines[ln - 1]
                for ln in lines if 0 < ln <= len(edited_lines))
    return {
        "step": hooks or any(step.lineno <= ln <= step.end_lineno for ln in lines),
        "pre": logs_before or any(body_start <= ln < step.lineno for ln in lines),
    }


def probe_diff(recorded: str, edited: str) -> str:
    """A unified diff of the edited cell against the recorded one."""
    return "".join(
        difflib.unified_diff(
            recorded.splitlines(keepends=True),
            edited.splitlines(keepends=True),
            fromfile="recorded",
            tofile="replayed",
        )
    )


def added_lines(recorded: str, edited: str) -> list[int]:
    """1-based line numbers of ``edited`` that are not in ``recorded``."""
    sm = difflib.SequenceMatcher(a=recorded.splitlines(), b=edited.splitlines(), autojunk=False)
    out = []
    for op, _, _, j1, j2 in sm.get_opcodes():
        if op in ("insert", "replace"):
            out.extend(range(j1 + 1, j2 + 1))
    return out
