"""Which earlier cells a training cell depends on.

A notebook's history holds every cell ever run, including ones that trained for
an hour. Replay must re-run only the cells that define what the training cell
uses. Each executed cell is kept as a :class:`Cell` with the names it actually
bound (the extension diffs the namespace around each cell, so helpers with
``global`` and star imports count) and the names it reads; the dependencies are
the closure of "latest cell before the read that binds or sets up a needed
name". A name a cell reads at the top level is read when that cell runs; a name
a function reads is read when the function is called, so for a function the
training cell calls, it is looked up as of the training cell.
"""
from __future__ import annotations

import ast
import builtins
import functools
from dataclasses import dataclass, field

from .errors import FlorError

_BUILTINS = set(dir(builtins)) | {"flor", "get_ipython", "__name__", "__file__", "display", "In", "Out", "exit", "quit"}


@dataclass
class Cell:
    """One executed cell: its execution count, Python source and bound names."""

    count: int
    source: str
    bound: set = field(default_factory=set)
    args: dict = field(default_factory=dict)  # flor.arg values the cell set (the extension records them)

    def to_dict(self):
        return {"count": self.count, "source": self.source, "bound": sorted(self.bound)}

    @classmethod
    def from_dict(cls, d):
        return cls(d["count"], d["source"], set(d.get("bound", ())))


class _Names(ast.NodeVisitor):
    """Walks module-level code in evaluation order, tracking reads before writes."""

    def __init__(self):
        self.assigned: set[str] = set()
        self.free: set[str] = set()
        self.deferred: set[str] = set()  # globals read inside function bodies
        self.loads: set[str] = set()  # every name read at the top level, bound here or not
        self.defs: dict[str, set] = {}  # function or class -> the globals its body reads
        self.immediate: set[str] = set()  # globals of comprehensions and lambdas (run or kept right here)

    def _store(self, target):
        for node in ast.walk(target):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                self.assigned.add(node.id)
            elif isinstance(node, (ast.Attribute, ast.Subscript)) and isinstance(node.ctx, ast.Store):
                self.visit(node.value)
                if isinstance(node, ast.Subscript):
                    self.visit(node.slice)
            elif isinstance(node, ast.Starred):
                pass

    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Load):
            self.loads.add(node.id)
        if isinstance(node.ctx, ast.Load) and node.id not in self.assigned:
            self.free.add(node.id)
        elif isinstance(node.ctx, ast.Store):
            self.assigned.add(node.id)

    def visit_Assign(self, node):
        self.visit(node.value)
        for t in node.targets:
            self._store(t)

    def visit_AnnAssign(self, node):
        if node.value is not None:
            self.visit(node.value)
        self._store(node.target)

    def visit_AugAssign(self, node):
        self.visit(node.value)
        if isinstance(node.target, ast.Name):
            if node.target.id not in self.assigned:
                self.free.add(node.target.id)
            self.assigned.add(node.target.id)
        else:
            self.visit(node.target)

    def visit_NamedExpr(self, node):
        self.visit(node.value)
        self.assigned.add(node.target.id)

    def _loop(self, node):
        self.visit(node.iter)
        self._store(node.target)
        for stmt in node.body + node.orelse:
            self.visit(stmt)

    visit_For = visit_AsyncFor = _loop

    def visit_Import(self, node):
        for alias in node.names:
            self.assigned.add(alias.asname or alias.name.split(".")[0])

    def visit_ImportFrom(self, node):
        for alias in node.names:
            if alias.name != "*":
                self.assigned.add(alias.asname or alias.name)

    def _function(self, node):
        for d in getattr(node, "decorator_list", []):
            self.visit(d)
        for default in node.args.defaults + [d for d in node.args.kw_defaults if d]:
            self.visit(default)
        reads = function_globals(node)
        if hasattr(node, "name"):
            self.assigned.add(node.name)
            self.defs[node.name] = reads
        else:
            self._immediate(reads)
        self.deferred |= reads

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_ClassDef(self, node):
        for expr in node.bases + node.decorator_list + [k.value for k in node.keywords]:
            self.visit(expr)
        self.assigned.add(node.name)
        reads = self.defs.setdefault(node.name, set())
        for stmt in node.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                reads |= function_globals(stmt)
                self.deferred |= function_globals(stmt)
            else:
                self.visit(stmt)

    def _comprehension(self, node):
        reads = function_globals(node)
        self.deferred |= reads
        self._immediate(reads)

    def _immediate(self, reads):
        """Globals a comprehension or lambda reads right here: a name bound above in this cell is not a read of
        an earlier cell, but it is a load (a function of this cell called here reads its own globals now)."""
        self.immediate |= reads - self.assigned
        self.loads |= reads

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _comprehension

    def visit_ExceptHandler(self, node):
        if node.type:
            self.visit(node.type)
        if node.name:
            self.assigned.add(node.name)
        for stmt in node.body:
            self.visit(stmt)

    def visit_withitem(self, node):
        self.visit(node.context_expr)
        if node.optional_vars is not None:
            self._store(node.optional_vars)


def function_globals(node) -> set[str]:
    """Names a function (or lambda, comprehension) reads that are not its own locals."""
    local: set[str] = set()
    declared_global: set[str] = set()
    loads: set[str] = set()
    args = getattr(node, "args", None)
    if args is not None:
        for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
            if a is not None:
                local.add(a.arg)
    for sub in ast.walk(node):
        if isinstance(sub, ast.Global):
            declared_global |= set(sub.names)
        elif isinstance(sub, ast.Name):
            (loads if isinstance(sub.ctx, ast.Load) else local).add(sub.id)
        elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and sub is not node:
            local.add(sub.name)
        elif isinstance(sub, ast.arg):
            local.add(sub.arg)
        elif isinstance(sub, (ast.Import, ast.ImportFrom)):
            for alias in sub.names:
                local.add(alias.asname or alias.name.split(".")[0])
    return (loads - (local - declared_global)) - _BUILTINS


def _walk(source: str) -> _Names:
    tree = ast.parse(source)
    v = _Names()
    for stmt in tree.body:
        v.visit(stmt)
    # `global x` inside a function that the cell defines binds x when called.
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            v.assigned |= set(node.names)
    return v


def analyze(source: str) -> tuple[set[str], set[str]]:
    """Return (free names read before being bound, names bound) at cell level."""
    v = _walk(source)
    free = (v.free | (v.deferred - v.assigned)) - _BUILTINS
    return free, v.assigned


def reads(source: str) -> tuple[set[str], dict[str, set]]:
    """(names read when the cell runs, {function or class it defines: globals read when it is used}).

    A function the cell calls itself (``model = build()``) reads its globals when the cell runs.
    """
    v = _walk(source)
    now = v.free | v.immediate
    for name, names in v.defs.items():
        if name in v.loads:  # but the cell's own functions and classes (super(VAE, self) in VAE): bound by then
            now |= names - set(v.defs)
    return now - _BUILTINS, {k: n - _BUILTINS for k, n in v.defs.items()}


def mutated_names(source: str) -> set[str]:
    """Names whose object a cell changes outside any loop: ``m.fc = ...``, ``m.to(dev)``, ``d[k] = v``."""
    out: set[str] = set()

    def root(expr):
        while isinstance(expr, (ast.Attribute, ast.Subscript, ast.Call)):
            expr = expr.func if isinstance(expr, ast.Call) else expr.value
        return expr.id if isinstance(expr, ast.Name) else None

    def walk(stmts):
        for stmt in stmts:
            if isinstance(stmt, (ast.For, ast.AsyncFor, ast.While, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                for t in targets:
                    if isinstance(t, (ast.Attribute, ast.Subscript)) and root(t):
                        out.add(root(t))
            elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
                func = stmt.value.func
                if isinstance(func, ast.Attribute) and root(func):
                    out.add(root(func))
            for body in ("body", "orelse", "finalbody"):
                walk(getattr(stmt, body, []) or [])
            for handler in getattr(stmt, "handlers", []) or []:
                walk(handler.body)

    walk(ast.parse(source).body)
    return out


def arg_names(source: str) -> set[str]:
    """Names a cell passes to ``flor.arg("name", ...)`` (as text: for cells run before the extension)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    return {n.args[0].value for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "arg"
            and n.args and isinstance(n.args[0], ast.Constant) and isinstance(n.args[0].value, str)}


def has_loop(source: str) -> bool:
    return any(isinstance(s, (ast.For, ast.AsyncFor, ast.While)) for s in ast.parse(source).body)


def _trained(source: str) -> frozenset:
    """Names whose ``train()`` or ``fit()`` the cell calls as a statement: if one is an HF or Lightning trainer,
    an earlier training (the HF course trains once before the run it records), which a replay must not run
    again."""
    out = set()
    for stmt in ast.parse(source).body:
        call = stmt.value if isinstance(stmt, ast.Expr) else None
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr in ("train", "fit")
                and isinstance(call.func.value, ast.Name)):
            out.add(call.func.value.id)
    return frozenset(out)


# Cell magics that run their body once in the user namespace: the cell is its body. ``%%timeit`` is not
# one (it runs the body many times inside a function, so it binds nothing), nor are ``%%bash``,
# ``%%writefile`` and the like (their body is not Python): those cells are dropped like ``!shell`` lines.
BODY_MAGICS = {"time", "capture", "prun"}


def _magic(stmt) -> str | None:
    """The Python a ``%%time``/``%%capture``/``%%prun`` cell or a ``%time``/``%prun`` line runs, if ``stmt`` is one."""
    call = stmt.value if isinstance(stmt, ast.Expr) else None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
            and isinstance(call.func.value, ast.Call) and getattr(call.func.value.func, "id", None) == "get_ipython"
            and all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in call.args)):
        return None
    args = [a.value for a in call.args]
    if call.func.attr == "run_cell_magic" and len(args) == 3 and args[0] in BODY_MAGICS:
        return args[2]
    if call.func.attr == "run_line_magic" and len(args) == 2 and args[0] in ("time", "prun"):
        return args[1]
    return None


def strip_shell(source: str, transform=None) -> str:
    """The cell as plain Python that runs anywhere: ``%%time``/``%%capture``/``%%prun`` cells become their
    body; other top-level statements that need IPython (``%magics``, ``!shell``) are dropped.

    ``transform`` turns IPython syntax in a magic's body into Python (the extension passes IPython's
    ``transform_cell``); without it a body that is not plain Python is dropped.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""
    lines = source.splitlines()
    changed = False
    for stmt in reversed(tree.body):  # from the end, so earlier line numbers stay valid
        body = _magic(stmt)
        if body is not None:
            body = strip_shell(transform(body) if transform else body, transform)
            new = body.splitlines()
        elif any(isinstance(n, ast.Name) and n.id == "get_ipython" for n in ast.walk(stmt)):
            new = [""] * (stmt.end_lineno - stmt.lineno + 1)  # blank lines: the rest keeps its line numbers
        else:
            continue
        lines[stmt.lineno - 1: stmt.end_lineno] = new
        changed = True
    return "\n".join(lines) + "\n" if changed else source


def dependencies(history: list[Cell], target: str) -> list[Cell]:
    """The cells of ``history`` (in execution order) that ``target`` needs, in execution order."""
    return resolve(history, target)[0]


def resolve(history: list[Cell], target: str, trainers=frozenset()) -> tuple[list[Cell], set[str]]:
    """(the cells of ``history`` that ``target`` needs, in execution order; names it needs that none binds).

    For each name read, the cell needed is the latest one before the read that binds it, and any
    cell after that one that changes the object without looping (``model.to(dev)``; a cell that
    loops and only mutates is a training cell: never re-run, nor is one that calls ``train()`` or
    ``fit()`` of a name in ``trainers``, the HF or Lightning trainers of the namespace). A cell's
    top-level reads happen when it runs; the globals of a function or class it defines are read as of
    ``target`` (when the training cell calls it). Cells that are empty once IPython syntax is stripped
    (``%%flor`` cells) bind nothing that replay could rebuild.
    """
    infos = []
    for cell in history:
        source, parsed = _cell_info(cell.source)
        infos.append(None if parsed is None else (source, parsed[0], parsed[1], parsed[2] | cell.bound, parsed[3],
                                                  _training(parsed, trainers)))
    end = len(history)
    todo = [(name, end) for name in analyze(target)[0]]
    seen, chosen, missing = set(), set(), set()
    while todo:
        name, before = todo.pop()
        if (name, before) in seen:
            continue
        seen.add((name, before))
        binder = next((i for i in range(before - 1, -1, -1) if infos[i] and name in infos[i][3]), None)
        if binder is None:
            missing.add(name)
        picks = [] if binder is None else [binder]
        picks += [i for i in range((-1 if binder is None else binder) + 1, before)
                  if infos[i] and name in infos[i][4] and name not in infos[i][3] and not infos[i][5]]
        for i in picks:
            if i not in chosen:
                chosen.add(i)
                todo += [(n, i) for n in infos[i][1]]
            todo += [(n, end) for n in infos[i][2].get(name, ())]
    cells = [Cell(history[i].count, infos[i][0], history[i].bound, history[i].args) for i in sorted(chosen)]
    return cells, missing


def after_training(history: list[Cell], deps: list[Cell], trainers=frozenset()) -> dict[str, tuple[int, int]]:
    """{name: (In[n] of the dependency cell that binds it, In[t] of the training cell before it)}: names a replay
    would rebuild from an untrained state.

    Replay never re-runs a training cell that is not a dependency (a loop that only changes the model, an HF or
    Lightning ``train()``/``fit()``). A dependency cell that ran after one and reads anything (``base =
    evaluate(model)``, ``best = max(losses)``) may have seen what that training changed, even through an alias
    (``opt.step()`` changes ``model``): re-run in a replay it sees the state from before that training, and what
    it binds is not the recording's value. Such names are captured with the recorded cell's state.
    """
    chosen = {c.count for c in deps}
    training = None  # In[t] of the latest training cell skipped so far
    tainted: dict[str, tuple[int, int]] = {}
    for cell in history:
        source, parsed = _cell_info(cell.source)
        if parsed is None:
            continue
        if cell.count not in chosen:
            if _training(parsed, trainers):
                training = cell.count
            continue
        if training is not None and parsed[0]:  # a cell that reads nothing binds constants: no training in them
            for name in parsed[2] | cell.bound:
                tainted[name] = (cell.count, training)
        else:
            for name in parsed[2] | cell.bound:
                tainted.pop(name, None)  # bound again, from scratch, by a cell no training precedes
    return tainted


def _training(parsed, trainers) -> bool:
    """A training cell (replay never re-runs one that is not a dependency): a top-level loop, or ``train()`` /
    ``fit()`` of one of ``trainers``; ``parsed`` as :func:`_cell_info` gives it."""
    return parsed[4] or bool(parsed[5] & trainers)


@functools.lru_cache(maxsize=4096)
def _cell_info(source: str):
    """(the source without IPython syntax, (reads, function reads, bound, mutated, loops, names it trains) or
    None), parsed once per source: a kernel's history grows all day, and parsing every cell at each record made
    the recorded cell's fixed cost grow with it (see bench/results-overhead-kernel.md)."""
    source = strip_shell(source)
    if not source.strip():
        return source, None
    try:
        return source, (*reads(source), analyze(source)[1], mutated_names(source), has_loop(source),
                        _trained(source))
    except SyntaxError:
        return source, None


def _definitions(source: str) -> dict:
    """{name: (ast dump, source text)} of the top-level functions and classes a cell defines."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return {}
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            text = "\n".join(source.splitlines()[first - 1:node.end_lineno])
            out[node.name] = (ast.dump(node, include_attributes=False), text)
    return out


def kernel_edits(deps: list[dict], history: list[Cell], only: int | None = None) -> tuple[dict, list[str]]:
    """Functions and classes of a run's cells that this kernel defines differently now.

    A user adds a probe to ``train()`` in its cell and runs it again: replay should use that.
    Returns ``({dependency cell count: its source with the new definitions appended}, notes)``;
    ``only``: take the definitions of kernel cell In[only] (``--cell N``) whatever they are.
    """
    latest: dict = {}  # name -> (count, dump, text) of its latest definition in this kernel
    for cell in history:
        if only is not None and cell.count != only:
            continue
        for name, (dump, text) in _definitions(strip_shell(cell.source)).items():
            latest[name] = (cell.count, dump, text)
    if only is not None and not latest:
        raise FlorError(f"In[{only}] defines no function or class: --cell takes the cell with your edited helper.")
    edits: dict = {}
    notes: list[str] = []
    for dep in deps:
        recorded = _definitions(dep["source"])
        changed = [(name, latest[name]) for name, (dump, _) in recorded.items()
                   if name in latest and latest[name][1] != dump]
        if changed:
            edits[dep["count"]] = dep["source"] + "\n\n" + "\n\n".join(text for _, (_, _, text) in changed) + "\n"
            names = ", ".join(f"{n}()" for n, _ in changed)
            counts = ", ".join(sorted({f"In[{c}]" for _, (c, _, _) in changed}))
            notes.append(f"{names} from {counts} of this kernel (edited since the recording), in place of the "
                         f"recorded In[{dep['count']}]")
    return edits, notes
