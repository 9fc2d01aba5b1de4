"""An earlier training cell a replay need not run again.

A notebook trains, then trains more in a new cell: ``losses = []`` and a loop in In[3], then ``%%flor record``
on ``for epoch in range(6, 9): ... losses.append(...)``. The recorded cell reads ``losses``, so In[3] is one of
its dependency cells, and every replay worker ran that whole first training again while rebuilding the
namespace. What the replay needs from it is already in the checkpoint: the recorded cell's state holds
``losses``, the model and the optimizer. So where that is safe, a replay runs only the statements before the
training loop of such a cell (they bind names a replay restores anyway) and says so.

Safe means: nothing the replay runs before the checkpoint is restored reads what the cell binds (later
dependency cells, the replayed cell's statements before its epoch loop); every value a later dependency cell
binds is captured state (it may have computed from what the training changed, through any alias); and each of
its names the replayed code or the dependency cells' functions read is captured state. Otherwise the cell runs in full, as before.
"""
from __future__ import annotations

import ast

from .cells import analyze, reads, strip_shell
from .paths import root


def _trains(loop) -> bool:
    """A top-level loop that steps an optimizer or back-propagates: training, not data preparation."""
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("backward", "step")
               for n in ast.walk(loop))


def _before_loop(stmts):
    """(statements before the first training loop, that loop) or None."""
    for i, stmt in enumerate(stmts):
        if isinstance(stmt, (ast.For, ast.While)) and _trains(stmt):
            return stmts[:i], stmt
    return None


def stand_ins(deps: list[dict], code: str, roots, not_captured, rebuilt=(), edited=()) -> dict[int, str]:
    """{In[n] of a dependency cell: the source a replay runs instead}: earlier training cells cut to the
    statements before their training loop, where that is safe (see the module docstring).

    ``rebuilt``: values the dependency cells bound beyond the state (setup_check): one the replayed code reads
    and the training loop touches (``sched.step()`` on a scheduler the recorded cell never reads) keeps the cell
    whole, so it is rebuilt as trained."""
    captured = set(roots) - {root(p) for p in not_captured}
    sources = [(c["count"], strip_shell(c["source"])) for c in deps]
    try:
        tree = ast.parse(code)
        parsed = [(n, s, ast.parse(s)) for n, s in sources]
    except SyntaxError:
        return {}
    preamble = next((tree.body[:i] for i, s in enumerate(tree.body) if isinstance(s, (ast.For, ast.While))),
                    tree.body)
    early = analyze(ast.unparse(ast.Module(body=preamble, type_ignores=[])))[0]
    by_fn = {name: names for _, s, _ in parsed for name, names in reads(s)[1].items()}  # function -> its globals
    fn_reads = set().union(*by_fn.values())
    read_by_code = analyze(code)[0] | fn_reads
    out = {}
    for i, (count, source, mod) in enumerate(parsed):
        cut = _before_loop(mod.body)
        if cut is None or count in edited or any(isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                                                 for s in mod.body):
            continue
        bound = analyze(source)[1] | set(deps[i].get("bound") or ())
        later = [(reads(s)[0], _values(m, analyze(s)[1] | set(deps[j].get("bound") or ())))
                 for j, (_, s, m) in enumerate(parsed[i + 1:], start=i + 1)]
        if bound & (set().union(*(r for r, _ in later)) | early) or not (bound & read_by_code) <= captured:
            continue
        # A later cell may compute from what the loop trained, by any alias (baseline = evaluate(model)), and
        # would see the untrained state: only where all the values it binds come from the checkpoint anyway.
        if any(not b <= captured for _, b in later):
            continue
        kept, loop = cut
        values = {n for n, v in dict(rebuilt).items() if v[2:] in ([], ["v"], ["v2"])}  # not loaders' data, functions
        touched = {n.id for n in ast.walk(loop) if isinstance(n, ast.Name)}
        todo = list(touched)
        while todo:  # and what the functions it calls use: train_step() reading the global model
            for name in by_fn.get(todo.pop(), ()):
                if name not in touched:
                    touched.add(name)
                    todo.append(name)
        if touched & read_by_code & values:
            continue
        out[count] = (ast.unparse(ast.Module(body=kept, type_ignores=[])) + "\n") if kept else "pass\n"
    return out


def _values(mod, names: set) -> set:
    """``names`` less those a cell binds to code (``def``, ``class``, ``import``): what it computes."""
    code = {s.name for s in mod.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    code |= {(a.asname or a.name).split(".")[0] for s in mod.body if isinstance(s, (ast.Import, ast.ImportFrom))
             for a in s.names}
    return names - code
