"""Probe lines leave training's random generators as they found them.

A replay must train exactly as the recording did, or its verdict says a probe changed training. A probe
that evaluates on a validation ``DataLoader`` draws from torch's global generator without saying so
(every iterator of a loader without its own generator draws a base seed), and one that adds noise or
samples draws on purpose; either shifts every later dropout mask and shuffle. So each statement a replay
*adds* to the recorded cell runs inside :func:`kept`, which puts the global generators (torch's, each
initialized CUDA device's, numpy's and Python's) back as they were before it. Training then draws what it
drew when recorded, and the probe reads the state the recorded training had at that line.

The same holds for statements inserted into the functions of a dependency cell a replay edits (a probe in the
``train()`` helper the epoch loop calls, in a Lightning ``training_step``): :func:`guard` with
``functions_only``; statements the cell runs at top level, while the replay rebuilds the namespace, are left be.

Only whole inserted statements are guarded: a recorded line the user changed may itself train (its dropout
draws belong to training), and generators the cells made themselves (a loader's ``generator=``) are not
touched; a probe that advances one still shows as a divergence in the verdict.
"""
from __future__ import annotations

import ast
import contextlib
import random
import sys

import torch

from .cells import strip_shell
from .edits import inserted_lines
from .instrument import RUNTIME


@contextlib.contextmanager
def kept():
    """Run the block, then put back the global generators it may have drawn from."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    np = sys.modules.get("numpy")
    np_state = np.random.get_state() if np is not None else None
    py = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        if np_state is not None:
            np.random.set_state(np_state)
        random.setstate(py)


def guarded_cell(src: str, cell: dict):
    """A dependency cell's source (shell lines stripped), or, when the replay edited it (``cell["recorded_source"]``),
    its tree with the statements inserted into its functions guarded (their draws from the global generators
    undone)."""
    if not cell.get("recorded_source"):
        return src
    tree = ast.parse(src)
    guard(tree, strip_shell(cell["recorded_source"]), src, functions_only=True)
    return tree


def guard(tree: ast.Module, recorded: str, edited: str, functions_only: bool = False) -> list[int]:
    """Wrap each run of consecutive statements of ``tree`` (the edited cell's) whose lines were all inserted into
    ``recorded`` in one ``with __flor__.probe_rng.kept():`` (with ``functions_only``, only inside a function or
    method); returns the lines guarded. Only where the edit inserted statements and changed none.

    A run is guarded as one block: ``torch.manual_seed(1)`` then ``flor.log("r", torch.rand(1))`` draw as they
    would in a run that had them. Nothing is guarded when the cell without those runs is not the recorded one: a
    recorded line was changed (its draws may be training's), or the line diff took a recorded statement for an
    inserted one (a probe that copies the loop's lines can make it align them with the copy) and guarding it would
    undo training's own draws; the diff is tried both ways (from the top, then from the bottom). The replay then
    runs as before, and its verdict judges it.
    """
    n = len(edited.splitlines())
    flipped = inserted_lines("\n".join(recorded.splitlines()[::-1]), "\n".join(edited.splitlines()[::-1]))
    for added in (set(inserted_lines(recorded, edited)), {n + 1 - j for j in flipped}):
        if added:
            found = _guard(tree, recorded, edited, functions_only, added)
            if found is not None:
                return found
    return []


def _guard(tree, recorded, edited, functions_only, added) -> list[int] | None:
    """:func:`guard` with ``added`` as the inserted lines; None (nothing done) when they do not fit."""
    def inserted(stmt) -> bool:
        lines = set(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
        return lines <= added and not isinstance(stmt, (ast.Global, ast.Nonlocal))

    try:
        was = ast.dump(ast.parse(recorded))
    except SyntaxError:
        return None
    runs: list[list] = []

    def visit(stmts: list, inside: bool) -> list:
        out, run = [], []
        for stmt in stmts + [None]:
            if stmt is not None and inside and inserted(stmt):
                run.append(stmt)
                continue
            if run:
                call = ast.Call(func=ast.Attribute(value=ast.Attribute(value=ast.Name(RUNTIME, ast.Load()),
                                                                       attr="probe_rng", ctx=ast.Load()),
                                                   attr="kept", ctx=ast.Load()), args=[], keywords=[])
                block = ast.copy_location(ast.With(items=[ast.withitem(context_expr=call)], body=run), run[0])
                block.flor_guard = True
                out.append(block)
                runs.append(run)
                run = []
            if stmt is None:
                break
            deeper = inside or isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef))
            for field in ("body", "orelse", "finalbody"):
                inner = getattr(stmt, field, None)
                if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt):
                    setattr(stmt, field, visit(inner, deeper))
            for handler in getattr(stmt, "handlers", None) or ():
                handler.body = visit(handler.body, deeper)
            for case in getattr(stmt, "cases", None) or ():
                case.body = visit(case.body, deeper)
            out.append(stmt)
        return out

    # Checked on a copy first: without the runs it would guard, the edited cell must be the recorded one.
    probe = ast.parse(edited)
    probe.body = visit(probe.body, True)  # top-level statements inserted into a dependency cell are no change either
    if ast.dump(_Unguard().visit(probe)) != was:
        return None
    runs.clear()
    tree.body = visit(tree.body, not functions_only)
    ast.fix_missing_locations(tree)
    return sorted({line for run in runs for stmt in run for line in range(stmt.lineno, stmt.end_lineno + 1)})


class _Unguard(ast.NodeTransformer):
    """Drops the blocks :func:`guard` made (what is left is the cell without its probes)."""

    def generic_visit(self, node):
        for field in ("body", "orelse", "finalbody"):
            inner = getattr(node, field, None)
            if isinstance(inner, list):
                setattr(node, field, [s for s in inner if not getattr(s, "flor_guard", False)])
        return super().generic_visit(node)
