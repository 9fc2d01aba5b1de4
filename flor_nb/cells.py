"""Which earlier cells a training cell depends on.

A notebook's history holds every cell ever run, including ones that trained for
an hour. Replay must re-run only the cells that define what the training cell
uses. Each executed cell is kept as a :class:`Cell` with the names it actually
bound (the extension diffs the namespace around each cell, so helpers with
``global`` and star imports count) and the names it reads; the dependencies are
the closure of "latest earlier cell that binds or sets up a needed name".
"""
from __future__ import annotations

import ast
import builtins
from dataclasses import dataclass, field

_BUILTINS = set(dir(builtins)) | {"flor", "get_ipython", "__name__", "__file__", "display", "In", "Out", "exit", "quit"}


@dataclass
class Cell:
    """One executed cell: its execution count, Python source and bound names."""

    count: int
    source: str
    bound: set = field(default_factory=set)

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
        if hasattr(node, "name"):
            self.assigned.add(node.name)
        self.deferred |= function_globals(node)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_ClassDef(self, node):
        for expr in node.bases + node.decorator_list + [k.value for k in node.keywords]:
            self.visit(expr)
        self.assigned.add(node.name)
        for stmt in node.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.deferred |= function_globals(stmt)
            else:
                self.visit(stmt)

    def _comprehension(self, node):
        self.deferred |= function_globals(node)

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


def analyze(source: str) -> tuple[set[str], set[str]]:
    """Return (free names read before being bound, names bound) at cell level."""
    tree = ast.parse(source)
    v = _Names()
    for stmt in tree.body:
        v.visit(stmt)
        # `global x` inside a function that the cell defines binds x when called.
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            v.assigned |= set(node.names)
    free = (v.free | (v.deferred - v.assigned)) - _BUILTINS
    return free, v.assigned


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


def has_loop(source: str) -> bool:
    return any(isinstance(s, (ast.For, ast.AsyncFor, ast.While)) for s in ast.parse(source).body)


def strip_shell(source: str) -> str:
    """Drop top-level statements that need IPython (``%magics``, ``!shell``) so a cell runs anywhere."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""
    keep = [
        s for s in tree.body
        if not any(isinstance(n, ast.Name) and n.id == "get_ipython" for n in ast.walk(s))
    ]
    if len(keep) == len(tree.body):
        return source
    lines = source.splitlines()
    return "\n".join("\n".join(lines[s.lineno - 1: s.end_lineno]) for s in keep)


def dependencies(history: list[Cell], target: str) -> list[Cell]:
    """The cells of ``history`` (in execution order) that ``target`` needs, in execution order.

    A cell is needed when it is the latest one to bind a needed name, or when it
    changes a needed object (``model.to(dev)``) after that binding without
    looping (a cell that loops and only mutates is a training cell: never re-run).
    """
    needed, _ = analyze(target)
    chosen: list[Cell] = []
    for cell in reversed(history):
        source = strip_shell(cell.source)
        if not source.strip():
            continue
        try:
            free, bound = analyze(source)
            mutated = mutated_names(source)
        except SyntaxError:
            continue
        bound = bound | cell.bound
        binds = bound & needed
        mutates = (mutated - bound) & needed and not has_loop(source)
        if binds or mutates:
            chosen.append(Cell(cell.count, source, cell.bound))
            needed = (needed - binds) | free
    return list(reversed(chosen))
