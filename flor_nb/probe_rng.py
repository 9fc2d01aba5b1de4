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


def guard(tree: ast.Module, recorded: str, edited: str, functions_only: bool = False) -> list[int]:
    """Wrap each statement of ``tree`` (the edited cell's) whose lines were all inserted into ``recorded`` in
    ``with __flor__.probe_rng.kept():`` (with ``functions_only``, only those inside a function or method);
    returns the first lines of those wrapped."""
    added = set(inserted_lines(recorded, edited))
    wrapped: list[int] = []

    def visit(stmts: list, inside: bool = not functions_only) -> list:
        out = []
        for stmt in stmts:
            lines = set(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
            if inside and lines <= added and not isinstance(stmt, (ast.Global, ast.Nonlocal)):
                call = ast.Call(func=ast.Attribute(value=ast.Attribute(value=ast.Name(RUNTIME, ast.Load()),
                                                                       attr="probe_rng", ctx=ast.Load()),
                                                   attr="kept", ctx=ast.Load()), args=[], keywords=[])
                out.append(ast.copy_location(ast.With(items=[ast.withitem(context_expr=call)], body=[stmt]), stmt))
                wrapped.append(stmt.lineno)
                continue
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

    tree.body = visit(tree.body)
    ast.fix_missing_locations(tree)
    return sorted(wrapped)
