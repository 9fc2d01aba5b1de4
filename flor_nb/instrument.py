"""Find the epoch and step loops of a training cell and wrap them with ``flor.loop``.

The epoch loop is the cell's first top-level ``for`` that trains (calls
``backward()``/``step()`` or loops over data); the step loop is the loop in it
that iterates the training data: see :func:`_pick_step`. Loops over parameters
or param groups are never either. ``flor.loop`` markers win over both; a run
stores the loops it chose (:meth:`Loops.choice`) so replay of an edited cell
uses the same ones. Wrapping keeps every line number, so tracebacks point at
the user's lines.
"""
from __future__ import annotations

import ast
import re
import types
from dataclasses import dataclass

import torch

from .errors import AmbiguousLoopError, NoLoopError, ProbeSyntaxError
from .hidden_loops import called_loop

RUNTIME = "__flor__"  # name the instrumented code uses for the flor_nb module

# Iterating these is walking a model or an optimizer, never data.
_PARAM_CALLS = {"parameters", "named_parameters", "buffers", "named_buffers", "modules", "named_modules",
                "children", "named_children", "state_dict"}
_PARAM_ATTRS = {"param_groups"}
_DATA_WORDS = re.compile(r"loader|dataset|batch|^(dl|dls|ds|data|iterator|samples)$", re.IGNORECASE)
_MICRO_WORDS = re.compile(r"micro|accum", re.IGNORECASE)  # n_micro_batches: a loop inside the batch loop
_EVAL_WORDS = re.compile(r"^(val|valid|test|eval|dev|holdout)|^(dev|ev)$", re.IGNORECASE)


@dataclass
class Loops:
    epoch_line: int
    step_line: int | None
    epoch_explicit: bool
    step_explicit: bool
    epoch_header: str = ""
    step_header: str | None = None
    epoch_nth: int = 0  # among loops with the same header (a probe may repeat one)
    step_nth: int = 0
    unit: str = "epochs"  # what one pass of the outer loop is: "epochs", or "iterations" (one training step each)
    framework: dict | None = None  # a trainer.train()/fit() call the framework's epochs run in (see flor_nb.frameworks)

    def choice(self) -> dict:
        """What a run stores, so a replay picks the same loops in the edited cell (see :func:`recorded_loops`)."""
        step = None if self.step_header is None else {"header": self.step_header, "nth": self.step_nth}
        out = {"epoch": {"header": self.epoch_header, "nth": self.epoch_nth}, "step": step, "unit": self.unit}
        if self.framework:
            out["framework"] = self.framework
        return out


# Runs recorded before runs stored their loops used this rule: the first top-level for, the first for in it.
FIRST_LOOPS = {"rule": "first"}


def recorded_loops(state: dict | None) -> dict:
    """The loops a run was recorded with, from its ``state``: its stored choice, or the old rule."""
    return (state or {}).get("loops") or FIRST_LOOPS


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


def _tops(stmts):
    """Loops (for and while) not inside another loop, in order, looking into if/with/try blocks."""
    for stmt in stmts:
        if isinstance(stmt, (ast.For, ast.AsyncFor, ast.While)):
            yield stmt
            continue
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for field in ("body", "orelse", "finalbody"):
            yield from _tops(getattr(stmt, field, []) or [])
        for handler in getattr(stmt, "handlers", []) or []:
            yield from _tops(handler.body)


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


def header(loop) -> str:
    """``for xb, yb in loader`` as written (normalized), to find the loop again in an edited cell."""
    if isinstance(loop, ast.While):
        return f"while {ast.unparse(loop.test)}"
    return f"for {ast.unparse(loop.target)} in {ast.unparse(loop.iter)}"


def _wrap_while(tree, loop: ast.While):
    """``while cond: body`` -> ``for __flor_i__ in __flor__.loop("epoch", __flor__.While(lambda: (cond))): body``.

    Same lines, and the same ``break``/``continue``/``else`` behaviour; the condition is evaluated by
    the loop wrapper, so recording (and replay) see every iteration begin and the loop end.
    """
    if any(isinstance(n, ast.NamedExpr) for n in ast.walk(loop.test)):
        raise NoLoopError(
            f"The while loop at line {loop.lineno} assigns in its condition (`:=`), which flor_nb cannot "
            "wrap. Assign before the loop and at the end of its body, or use "
            "`for i in flor.loop('epoch', itertools.count()):` with a break.")
    while_call = ast.Call(func=ast.Attribute(value=ast.Name(id=RUNTIME, ctx=ast.Load()), attr="While", ctx=ast.Load()),
                          args=[ast.Lambda(args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[],
                                                              defaults=[]), body=loop.test)], keywords=[])
    new = ast.For(target=ast.Name(id="__flor_i__", ctx=ast.Store()), iter=while_call, body=loop.body,
                  orelse=loop.orelse, type_comment=None)
    ast.copy_location(new, loop)
    ast.copy_location(while_call, loop.test)
    for parent in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            stmts = getattr(parent, field, None)
            if isinstance(stmts, list) and any(x is loop for x in stmts):
                stmts[[i for i, x in enumerate(stmts) if x is loop][0]] = new
                _wrap(new, "epoch")
                return new
        for handler in getattr(parent, "handlers", []) or []:
            if any(x is loop for x in handler.body):
                handler.body[[i for i, x in enumerate(handler.body) if x is loop][0]] = new
                _wrap(new, "epoch")
                return new
    raise AssertionError("while loop not found in its tree")


def _direct_calls(loop, attrs=("backward", "step"), ns=None) -> set[str]:
    """Which of ``attrs`` the loop's own body (not a nested loop) calls as methods; a learning-rate scheduler's
    ``step()`` (pytorch/examples' MNIST: ``train(...)``, ``test(...)``, ``scheduler.step()``) is not training."""
    found, stack = set(), list(loop.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.For, ast.AsyncFor, ast.While, ast.FunctionDef, ast.AsyncFunctionDef,
                             ast.ClassDef, ast.Lambda)):
            continue
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in attrs
                and not _scheduler(node.func.value, ns)):
            found.add(node.func.attr)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _scheduler(node, ns) -> bool:
    if not (ns and isinstance(node, ast.Name)):
        return False
    import torch

    return isinstance(ns.get(node.id), (torch.optim.lr_scheduler.LRScheduler,
                                        torch.optim.lr_scheduler.ReduceLROnPlateau))


def _direct_training(loop, ns=None) -> bool:
    """The loop's own body (not a nested loop) calls ``backward()`` or ``step()``: one pass may be one step."""
    return bool(_direct_calls(loop, ns=ns))


# -- which loop is which --------------------------------------------------------
def _text(node) -> str:
    """Source-like text of a loop target or iterable: ``xb, yb`` rather than ``(xb, yb)``."""
    if isinstance(node, ast.Tuple) and node.elts:
        return ", ".join(ast.unparse(e) for e in node.elts)
    return ast.unparse(node)


def _names_in(expr) -> list[str]:
    return [n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(expr)
            if isinstance(n, (ast.Name, ast.Attribute))]


def _over_params(loop, ns) -> bool:
    """``for p in model.parameters()``, ``for g in opt.param_groups``, ``for layer in model``: not data."""
    if isinstance(loop, ast.While):
        return False
    for n in ast.walk(loop.iter):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in _PARAM_CALLS:
            return True
        if isinstance(n, ast.Attribute) and n.attr in _PARAM_ATTRS:
            return True
    value = _value(loop.iter, ns)
    if isinstance(value, (torch.nn.Module, torch.optim.Optimizer)):
        return True
    if isinstance(value, (list, tuple)) and value:
        first = value[0]
        return (isinstance(first, torch.Tensor) and first.requires_grad) or (isinstance(first, dict) and "params" in first)
    return False


def _value(expr, ns):
    """The object a plain name (or ``enumerate(name)``, ``tqdm(name)``) refers to, when the namespace is known."""
    if ns is None:
        return None
    while isinstance(expr, ast.Call) and expr.args:
        expr = expr.args[0]
    return ns.get(expr.id) if isinstance(expr, ast.Name) else None


def _iterates_data(loop, ns) -> bool:
    """A DataLoader or Dataset (known at record time), or a name that says so (``train_loader``, ``batches``)."""
    if isinstance(loop, ast.While):
        return False
    if isinstance(_value(loop.iter, ns), (torch.utils.data.DataLoader, torch.utils.data.Dataset)):
        return True
    names = _names_in(loop.iter)
    if any(_MICRO_WORDS.search(name) for name in names):
        return False
    return any(_DATA_WORDS.search(part) for name in names for part in name.split("_") + [name])


def _calls(loop, attrs: set, trainers: set) -> bool:
    for n in ast.walk(loop):
        if isinstance(n, ast.Call):
            if isinstance(n.func, ast.Attribute) and n.func.attr in attrs:
                return True
            if "backward" in attrs and isinstance(n.func, ast.Name) and n.func.id in trainers:
                return True
    return False


def _evaluates(loop, parents) -> bool:
    """An evaluation loop: over ``val_loader`` and the like, or under ``torch.no_grad()``."""
    if any(_EVAL_WORDS.search(part) for name in _names_in(loop.iter) for part in name.split("_")):
        return True
    for p in parents.get(loop, ()):
        if isinstance(p, (ast.With, ast.AsyncWith)) and any(
                re.search(r"no_grad|inference_mode", ast.unparse(item.context_expr)) for item in p.items):
            return True
    return False


def trainers_in(ns) -> set[str]:
    """Functions in a namespace whose code calls ``backward`` (a ``train_step(xb, yb)`` helper)."""
    out = set()
    for name, fn in (ns or {}).items():
        if isinstance(fn, types.FunctionType):
            stack = [fn.__code__]
            while stack:
                code = stack.pop()
                if "backward" in code.co_names:
                    out.add(name)
                    break
                stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return out


def _outermost(loops, parents) -> list:
    chosen = set(loops)
    return [f for f in loops if not any(p in chosen for p in parents.get(f, ()))]


def _parents(root) -> dict:
    """Each node inside ``root`` -> its ancestors, innermost first."""
    out: dict = {}

    def walk(node, chain):
        for child in ast.iter_child_nodes(node):
            out[child] = (node, *chain)
            walk(child, out[child])

    walk(root, ())
    return out


def _pick_step(epoch, candidates, ns, trainers, what):
    """The loop over the training data: among loops that call ``backward()`` (else ``step()``) and
    loops over data, the outermost that is both, else the outermost of either; evaluation loops last."""
    parents = _parents(epoch)
    cands = [f for f in candidates if not _over_params(f, ns)]
    direct = _direct_calls(epoch, ns=ns)

    def micro(f):
        return any(_MICRO_WORDS.search(n) for n in _names_in(f.iter) + _names_in(f.target))
    if "backward" in direct:
        # One pass of the outer loop is one training step (makemore): a loop inside it that does not
        # itself call backward() (over parameters, to zero grads) is part of the step.
        cands = [f for f in cands if _calls(f, {"backward"}, trainers) and not micro(f)]
    elif "step" in direct:
        # The optimizer steps once per pass (nanoGPT): a micro-batch loop inside is part of that step.
        cands = [f for f in cands if not micro(f)]
    if not cands:
        return None
    data = [f for f in cands if _iterates_data(f, ns)]
    train = [f for f in cands if _calls(f, {"backward"}, trainers)] or [f for f in cands if _calls(f, {"step"}, set())]
    pool = ([f for f in train if f in data] or train) if train else (data or cands)
    top = _outermost(pool, parents)
    if len(top) > 1:
        not_eval = [f for f in top if not _evaluates(f, parents)]
        top = not_eval if not_eval else top
    if len(top) > 1:
        a, b = top[:2]
        raise AmbiguousLoopError(
            f"Two loops in the epoch loop of this {what} could be the step loop: line {a.lineno} "
            f"`for {_text(a.target)} in {_text(a.iter)}:` and line {b.lineno} `for {_text(b.target)} in "
            f"{_text(b.iter)}:`. Mark the one over the training batches, e.g. "
            f"`for {_text(a.target)} in flor.loop(\"step\", {_text(a.iter)}):`.",
            [a.lineno, b.lineno])
    return top[0]


def _pick_epoch(tops, ns, trainers):
    """The first top-level loop that trains (calls backward()/step() or holds a loop over data)."""
    cands = [f for f in tops if not _over_params(f, ns)] or tops
    for f in cands:
        if _calls(f, {"backward", "step"}, trainers) or any(
                _iterates_data(g, ns) for g in _fors(f.body, into_loops=True)):
            return f
    return cands[0] if cands else None


def _trains(loop) -> bool:
    return _calls(loop, {"backward", "step"}, set())


def _hidden_loop(tree):
    """(function, line of its loop, line of its call) for a loop that trains inside a function the cell defines."""
    for fn in (n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        loops = [f for f in ast.walk(fn) if isinstance(f, (ast.For, ast.While)) and _trains(f)]
        if loops:
            call = next((n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                         and n.func.id == fn.name), None)
            return fn.name, loops[0].lineno, call
    return None


def _hinted(loops, hint):
    """The loop a run chose (``{"header", "nth"}``), found again by its header; None if it is gone."""
    same = [f for f in loops if header(f) == hint["header"]]
    return (same[hint["nth"]] if hint["nth"] < len(same) else same[0]) if same else None


def _nth(loops, loop) -> int:
    same = [f for f in loops if header(f) == header(loop)]
    return same.index(loop) if loop in same else 0


def _find(tree: ast.Module, what: str, hint=None, ns=None, trainers=frozenset()):
    """(epoch loop, step loop or None, epoch explicit, step explicit, epoch candidates, step candidates).

    ``hint`` is a run's :meth:`Loops.choice`: its loops win over the heuristics; ``ns`` (record time)
    lets the heuristics look at what the loops iterate.
    """
    all_fors = list(_fors(tree.body, into_loops=True))
    epoch = next((f for f in all_fors if _loop_marker(f.iter) == "epoch"), None)
    explicit = epoch is not None
    tops = list(_tops(tree.body))
    first = hint == FIRST_LOOPS
    if epoch is None and first:
        epoch = next((f for f in tops if not isinstance(f, ast.While)), None)
    elif epoch is None and hint:
        epoch = _hinted(tops, hint["epoch"])
    if epoch is None:
        epoch = _pick_epoch(tops, ns, trainers)
    if epoch is None:  # a marker inside a function the cell defines and calls: it drives the recording itself
        epoch = next((f for f in ast.walk(tree) if isinstance(f, ast.For) and _loop_marker(f.iter) == "epoch"), None)
        explicit = epoch is not None
    if isinstance(epoch, ast.AsyncFor):
        raise NoLoopError(f"The training loop at line {epoch.lineno} is an `async for`, which flor_nb cannot record. "
                          "Write it as a plain for loop in the cell.")
    if epoch is None:
        hidden = _hidden_loop(tree)
        if hidden:
            fn, loop, call = hidden
            where = f", which the cell calls at line {call}" if call else ""
            raise NoLoopError(
                f"The training loop is inside {fn}() (line {loop}){where}: flor_nb records the loop written in the "
                f"cell. Move the loop into the cell, or mark it where it is: `for epoch in flor.loop('epoch', ...):` "
                f"at line {loop}.")
        called = called_loop(tree, ns, _trains) if ns else None
        if called:
            name, where, line = called
            raise NoLoopError(
                f"The training loop is inside {name}() ({where}), which the cell calls at line {line}: flor_nb "
                "checkpoints a loop written in the cell, and cannot enter that one. Copy the loop into the cell, or "
                f"record the call as one unit (a replay then re-runs all of it, from the state before it, and "
                f"checks the state after it):\n    for _ in flor.loop('epoch', range(1)):\n        {name}()")
        raise NoLoopError(
            f"This {what} has no training loop, so there are no epochs or iterations to checkpoint. "
            "Put the training loop in the cell (for epoch in range(EPOCHS): ..., or a while loop), "
            "or mark it with `for epoch in flor.loop('epoch', range(EPOCHS)):`."
        )
    inner = list(_fors(epoch.body, into_loops=True))
    step = next((f for f in inner if _loop_marker(f.iter) == "step"), None)
    step_explicit = step is not None
    if step is None and first:
        step = inner[0] if inner else None
    elif step is None and hint and hint.get("step"):
        step = _hinted(inner, hint["step"])
    if step is None and not first and not (hint and "step" in hint and hint["step"] is None):
        step = _pick_step(epoch, inner, ns, trainers, what)
    return epoch, step, explicit, step_explicit, tops, inner


def instrument(source: str, what: str = "cell", hint: dict | None = None,
               namespace: dict | None = None) -> tuple[ast.Module, Loops]:
    """Return the cell's AST with its loops wrapped, and where they are.

    Parameters
    ----------
    hint : a run's :meth:`Loops.choice`; the loops it names win (replay of an edited cell).
    namespace : the globals the cell runs in (record time): what the loops iterate is looked at.
    """
    tree = parse(source, what)
    fit = _framework_call(tree, what, hint, namespace)
    if fit is not None:
        return tree, fit
    epoch, step, explicit, step_explicit, tops, inner = _find(tree, what, hint, namespace, trainers_in(namespace))
    unit = (hint or {}).get("unit") or (
        "iterations" if isinstance(epoch, ast.While) or (step is None and _direct_training(epoch, namespace)) else "epochs")
    loops = Loops(epoch.lineno, step.lineno if step else None, explicit, step_explicit, header(epoch),
                  header(step) if step else None, _nth(tops, epoch), _nth(inner, step) if step else 0, unit)
    if isinstance(epoch, ast.While):
        _wrap_while(tree, epoch)
    elif not explicit:
        _wrap(epoch, "epoch")
    if step is not None and not step_explicit:
        _wrap(step, "step")
    ast.fix_missing_locations(tree)
    return tree, loops


def _framework_call(tree, what, hint, namespace) -> Loops | None:
    """A top-level ``trainer.train()`` / ``trainer.fit(...)`` of HF transformers or Lightning, routed
    through ``__flor__.fit`` (the framework's epochs are the units); None when the cell has its own loop.
    An explicit ``flor.loop("epoch", ...)`` marker wins over the call."""
    if not (hint or {}).get("framework") and any(
            _loop_marker(f.iter) == "epoch" for f in _fors(tree.body, into_loops=True)):
        return None
    from .frameworks import calls

    found = calls.choose(tree, hint, namespace, what)
    if found is None:
        return None
    stmt, call, choice = found
    calls.route(stmt, call, RUNTIME)
    ast.fix_missing_locations(tree)
    return Loops(stmt.lineno, None, False, False, choice["call"], None, 0, 0, "epochs", choice)
