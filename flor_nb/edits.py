"""What an edited cell changes relative to the recorded one, and training loops in helper functions.

``changes`` tells the planner whether probes touch the step loop or the code before it;
``find_helper``/``helper_code`` find and instrument the step loop of a function an earlier cell
defined (``train(dataloader, model, ...)``) so it is checkpointed and probed like an inline one.
"""
from __future__ import annotations

import ast
import difflib
import types

from .errors import NoLoopError
from .instrument import Loops, _calls, _find, _fors, _hinted, _nth, _outermost, _over_params, _parents, _wrap, header, parse

def changes(recorded: str, edited: str, hint: dict | None = None) -> dict:
    """Where the edit touches the epoch body: ``step`` (the step loop), ``pre`` (before it).

    ``pre`` is also true when code before the step loop logs anything: its values need
    the true state at the epoch start, so such an epoch cannot be replayed on its own.
    """
    if (hint or {}).get("framework"):  # the framework's epochs run in full: no step loop to skip
        return {"step": True, "pre": True}
    tree = parse(edited, "replayed cell")
    epoch, step, *_ = _find(tree, "replayed cell", hint)
    if step is None:
        return {"step": True, "pre": True}
    lines = _edited_lines(recorded, edited)
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


def _edited_lines(recorded: str, edited: str) -> set[int]:
    """Lines of ``edited`` that differ from ``recorded`` (a deletion marks the lines around it)."""
    lines: set = set()
    sm = difflib.SequenceMatcher(a=recorded.splitlines(), b=edited.splitlines(), autojunk=False)
    for op, _, _, j1, j2 in sm.get_opcodes():
        if op != "equal":
            lines.update(range(j1 + 1, j2 + 1) if j2 > j1 else (j1, j1 + 1))
    return lines


def added_lines(recorded: str, edited: str) -> list[int]:
    """1-based line numbers of ``edited`` that are not in ``recorded``."""
    sm = difflib.SequenceMatcher(a=recorded.splitlines(), b=edited.splitlines(), autojunk=False)
    out = []
    for op, _, _, j1, j2 in sm.get_opcodes():
        if op in ("insert", "replace"):
            out.extend(range(j1 + 1, j2 + 1))
    return out


def inserted_lines(recorded: str, edited: str) -> list[int]:
    """1-based line numbers of ``edited`` inserted between lines of ``recorded`` (not ones that replace a
    recorded line)."""
    sm = difflib.SequenceMatcher(a=recorded.splitlines(), b=edited.splitlines(), autojunk=False)
    return [j for op, _, _, j1, j2 in sm.get_opcodes() if op == "insert" for j in range(j1 + 1, j2 + 1)]


def probe_carried(recorded: str, edited: str, epoch_line: int) -> list[str]:
    """Names statements inserted before the epoch loop bind and the loop reads (``vals = []`` before it, then
    ``vals.append(v)`` and ``flor.log("mean", ...)`` in it): state the probes carry across epochs, which no
    checkpoint holds, so a replay starting at a later epoch would lack the earlier ones' part."""
    try:
        tree = ast.parse(edited)
    except SyntaxError:
        return []
    added = set(inserted_lines(recorded, edited))
    bound: set = set()
    for stmt in tree.body:
        if stmt.lineno == epoch_line:
            return sorted((bound & _walk_names(stmt, ast.Load)) | _carried_in_loop(stmt, added, recorded))
        if set(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1)) <= added:
            bound |= _walk_names(stmt, ast.Store)
            bound |= {(a.asname or a.name).split(".")[0] for n in ast.walk(stmt)
                      if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
            bound |= {n.name for n in ast.walk(stmt) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return []


def added_around(recorded: str, edited: str, epoch_line: int) -> tuple[list[int], list[int]]:
    """1-based lines of ``edited`` added at its top level (blank ones left out) before its epoch loop (a probe of
    the model before training: they run on the state the cell starts with) and after it (a final evaluation's
    probe: they run on the state training left, after its last unit)."""
    try:
        tree = ast.parse(edited)
    except SyntaxError:
        return [], []
    loop = next((s for s in tree.body if s.lineno == epoch_line), None)
    if loop is None:
        return [], []
    lines = edited.splitlines()
    added = [ln for ln in added_lines(recorded, edited) if lines[ln - 1].strip()]
    return [ln for ln in added if ln < loop.lineno], [ln for ln in added if ln > loop.end_lineno]


def _carried_in_loop(loop, added: set, recorded: str) -> set:
    """Names the inserted lines bind inside the epoch loop and read where no earlier binding in the same epoch
    must have run: read before it (``flor.log("delta", val - prev)`` ... ``prev = val``), or after a binding
    inside a block (``if epoch == 0: baseline = val``). A value from an earlier epoch, then. Not names the
    recorded cell binds (training's: in the state)."""
    try:
        training = _walk_names(ast.parse(recorded), ast.Store)
    except SyntaxError:
        return set()
    where: dict = {}  # statement -> (the list of statements holding it, its index there)
    parent: dict = {}
    for node in ast.walk(loop):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if isinstance(block, list):
                for i, st in enumerate(block):
                    where[st] = (id(block), i)
        for child in ast.iter_child_nodes(node):
            parent[child] = node

    def chain(node):  # the statements around node, innermost first
        while node is not loop and node in parent:
            if node in where:
                yield node
            node = parent[node]

    comprehended = {id(n) for c in ast.walk(loop) if isinstance(c, ast.comprehension) for n in ast.walk(c.target)}
    stores, reads = {}, {}
    for n in ast.walk(loop):
        if isinstance(n, ast.Name) and n.lineno in added:
            if isinstance(n.ctx, ast.Store) and id(n) not in comprehended:  # a comprehension's own variable
                stores.setdefault(n.id, []).append(next(chain(n), None))
            elif isinstance(n.ctx, ast.Load):
                reads.setdefault(n.id, []).append(n)

    def dominated(read, binders) -> bool:
        around = list(chain(read))
        for st in binders:
            if st is None:
                continue
            if isinstance(st, (ast.For, ast.AsyncFor, ast.With, ast.AsyncWith, ast.Try)) and st in around:
                return True  # the loop's or with's own variable, read in its body
            if any(where[a][0] == where[st][0] and where[a][1] > where[st][1] for a in around):
                return True
        return False

    return {name for name, rs in reads.items() if name in stores and name not in training
            and not all(dominated(r, stores[name]) for r in rs)}


def _walk_names(tree, ctx) -> set:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ctx)}


# -- a step loop inside a helper function (the PyTorch quickstart: train(dataloader, model, ...)) ----------
def _top_defs(source: str) -> dict:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return {}
    return {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def find_helper(epoch_source: str, loops: "Loops", cells, ns=None) -> dict | None:
    """The function the epoch loop calls whose own loop trains: ``{"name", "cell", "header", "nth"}`` or None.

    ``cells``: (count, source) of the cells the run depends on; the latest one defining the function is
    where its code is (and what an edited replay replaces).
    """
    if loops.step_line is not None or loops.unit != "epochs":
        return None
    tree = parse(epoch_source)
    epoch = next((f for f in ast.walk(tree) if isinstance(f, (ast.For, ast.While)) and f.lineno == loops.epoch_line),
                 None)
    if epoch is None:
        return None
    called = [n.func.id for n in ast.walk(epoch) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    for name in dict.fromkeys(called):
        fn = (ns or {}).get(name)
        if ns is not None and not (isinstance(fn, types.FunctionType) and not fn.__code__.co_freevars):
            continue
        defined = [(count, src) for count, src in cells if name in _top_defs(src)]
        if not defined:
            continue
        count, src = defined[-1]
        node = _top_defs(src)[name]
        fors = list(_fors(node.body, into_loops=True))
        train = [f for f in fors if _calls(f, {"backward"}, set()) and not _over_params(f, ns)]
        if not train:
            continue
        step = _outermost(train, _parents(node))[0]
        return {"name": name, "cell": count, "header": header(step), "nth": _nth(fors, step)}
    return None


def helper_code(source: str, helper: dict, filename: str, recorded: str | None = None):
    """The helper's code object compiled from its cell ``source`` with its step loop wrapped in
    ``__flor__.loop("step", ...)``, lines unchanged: swapped into the live function's ``__code__``. With the
    cell's ``recorded`` source, statements inserted since leave the global generators be (probe_rng)."""
    node = _top_defs(source).get(helper["name"])
    if node is None:
        raise NoLoopError(f"Cell In[{helper['cell']}] no longer defines {helper['name']}(), whose loop was the "
                          "recorded step loop. Keep its definition there.")
    if recorded is not None and recorded != source:
        from .probe_rng import guard  # probe_rng imports this module

        guard(ast.Module(body=[node], type_ignores=[]), recorded, source)
    fors = list(_fors(node.body, into_loops=True))
    step = _hinted(fors, helper)
    if step is None:
        raise NoLoopError(f"The step loop `{helper['header']}` of {helper['name']}() is not in its cell any more. "
                          "Keep the loop's header as recorded, or mark it with flor.loop(\"step\", ...).")
    _wrap(step, "step")
    if helper.get("carry"):
        _carry_after(node, step, helper["carry"])
    module = ast.Module(body=[node], type_ignores=[])
    ast.fix_missing_locations(module)
    code = compile(module, filename, "exec")
    return next(c for c in code.co_consts if isinstance(c, types.CodeType) and c.co_name == helper["name"])


def _carry_after(fn, step, names):
    """After the helper's step loop: ``__flor_carried__ = __flor__._carry(names, locals())`` and, per name,
    ``if "total" in __flor_carried__: total = __flor_carried__["total"]`` (a name the loop left unbound stays so).
    On the loop's last line, so no other line moves."""
    line = step.end_lineno
    code = f"__flor_carried__ = __flor__._carry({tuple(names)!r}, locals())\n" + "".join(
        f"if {n!r} in __flor_carried__:\n    {n} = __flor_carried__[{n!r}]\n" for n in names)
    stmts = ast.parse(code).body
    for s in stmts:
        for n in ast.walk(s):
            if hasattr(n, "lineno"):
                n.lineno, n.end_lineno, n.col_offset, n.end_col_offset = line, line, 0, 0
    for parent in ast.walk(fn):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(parent, field, None)
            if isinstance(block, list) and any(b is step for b in block):
                i = next(j for j, b in enumerate(block) if b is step)
                block[i + 1:i + 1] = stmts
                return
    raise NoLoopError(f"The step loop of {fn.name}() is not in a block flor_nb can add to.")


def helper_touched(recorded: str, edited: str, helper: dict, hint: dict | None) -> dict:
    """:func:`changes` for a run whose step loop is in a helper: the cell's edits never touch the steps;
    they touch what comes before them when they sit (or log) before the helper's call in the epoch body."""
    tree = parse(edited, "replayed cell")
    epoch, *_ = _find(tree, "replayed cell", hint)
    call = next((n for n in ast.walk(epoch) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                 and n.func.id == helper["name"]), None)
    if call is None:
        return {"step": True, "pre": True}
    lines = _edited_lines(recorded, edited)
    pre_stmts = [s for s in epoch.body if s.end_lineno < call.lineno]
    logs_before = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "log"
                      for s in pre_stmts for n in ast.walk(s))
    return {"step": False, "pre": logs_before or any(epoch.body[0].lineno <= ln < call.lineno for ln in lines)}


def helper_reads_after_steps(source: str, helper: dict, cell: str = "") -> list[str]:
    """Local variables of the helper that its step loop sets or changes and its code after the loop reads
    (``total += loss.item()`` in the loop, ``return total / n`` after it). A replay that skipped the step loop
    would run that code on their values from before the loop (the step-exit state holds the cell's variables,
    not the helper's): the recording keeps them with that state (``helper["carry"]``, :func:`_carry_after`), and
    where it did not, the step loop runs. A parameter that every call in the ``cell``
    passes a variable of the cell for holds the cell's object, restored in place: changing it (``opt.step()``)
    does not count. ["?"] when the helper is not found."""
    node = _top_defs(source).get(helper["name"])
    step = _hinted(list(_fors(node.body, into_loops=True)), helper) if node is not None else None
    if step is None:
        return ["?"]
    from .liveness import _local_names

    local = _local_names(node)
    params = {a.arg for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)}
    rebound = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))}
    own = {p for p in params & _passed(cell, node) if p not in rebound}  # still the cell's object wherever it is used
    changed = {n.id for n in ast.walk(step) if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))}
    for n in ast.walk(step):  # changed through a method, an attribute or an item: losses.append(...), d[k] = v
        target = n.func.value if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) else \
            n.value if isinstance(n, (ast.Attribute, ast.Subscript)) and isinstance(n.ctx, ast.Store) else None
        while isinstance(target, (ast.Attribute, ast.Subscript)):
            target = target.value
        if isinstance(target, ast.Name) and target.id not in own:
            changed.add(target.id)
    # or by what it is given to (update(stats)), or iterated by the loop itself (an iterator it advances)
    given = [a for n in ast.walk(step) if isinstance(n, ast.Call) for a in (*n.args, *(k.value for k in n.keywords))]
    changed |= {n.id for a in (*given, step.iter) for n in ast.walk(a) if isinstance(n, ast.Name) and n.id not in own}
    # or by a function of the helper's own, which reaches its locals (nonlocal total; stats.append(v))
    inner = [n for n in ast.walk(node) if n is not node and isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                           ast.Lambda))]
    changed |= {n.id for f in inner for n in ast.walk(f) if isinstance(n, ast.Name) and n.id not in own}
    changed |= {name for f in inner for n in ast.walk(f) if isinstance(n, ast.Nonlocal) for name in n.names}
    after = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
             and n.lineno > step.end_lineno}
    return sorted(local & changed & after)


def call_binding(fn, call) -> dict | None:
    """{parameter of ``fn``: the variable ``call`` passes for it}, for the arguments that are plain variables;
    None when ``*args`` hides which parameter gets what (``**kwargs`` binds nothing seen here)."""
    if any(isinstance(a, ast.Starred) for a in call.args):
        return None
    params = [a.arg for a in (*fn.args.posonlyargs, *fn.args.args)]
    bound = {p: a.id for p, a in zip(params, call.args) if isinstance(a, ast.Name)}
    return bound | {k.arg: k.value.id for k in call.keywords if k.arg and isinstance(k.value, ast.Name)}


def _passed(cell: str, fn) -> set[str]:
    """Parameters of ``fn`` that every call of it in ``cell`` passes a plain variable for."""
    out = None
    for call in (n for n in ast.walk(parse(cell)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                 and n.func.id == fn.name):
        bound = call_binding(fn, call)
        if bound is None:
            return set()
        out = set(bound) if out is None else out & set(bound)
    return out or set()

