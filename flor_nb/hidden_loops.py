"""Training loops a cell runs but does not hold: inside a function or method it calls from a library or a
``.py`` file (minGPT's ``trainer.run()``). flor_nb checkpoints loops written in the cell; for these it can only
say where the loop is and how to record the call (see :func:`flor_nb.instrument.instrument`)."""
from __future__ import annotations

import ast
import inspect
import os
import textwrap
import types


def called_loop(tree, ns, trains):
    """(what the cell calls, where its loop is, line of the call) for a loop that ``trains`` inside a function or
    method the cell calls but does not define (``trainer.run()`` of minGPT's Trainer); None if none has one."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        fn = _resolve_static(node.func, ns)
        fn = getattr(fn, "__func__", fn)
        if not isinstance(fn, types.FunctionType):
            continue
        try:
            src = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        except (OSError, TypeError, SyntaxError):
            continue
        loops = [f for f in ast.walk(src) if isinstance(f, (ast.For, ast.While)) and trains(f)]
        if loops:
            line = fn.__code__.co_firstlineno + loops[0].lineno - 1
            path = fn.__code__.co_filename
            if os.path.isabs(path) and path.startswith(os.getcwd() + os.sep):
                path = os.path.relpath(path)
            where = f"{fn.__qualname__}, {path} line {line}"
            return ast.unparse(node.func), where, node.lineno
    return None


def _resolve_static(expr, ns):
    """The object ``a.b.c`` names in ``ns``, read without running properties or ``__getattr__``."""
    if isinstance(expr, ast.Name):
        return ns.get(expr.id)
    if isinstance(expr, ast.Attribute):
        base = _resolve_static(expr.value, ns)
        if base is None:
            return None
        try:
            value = inspect.getattr_static(base, expr.attr)
        except AttributeError:
            return None
        if isinstance(value, types.FunctionType) and not isinstance(base, type):
            return types.MethodType(value, base)
        return value
    return None
