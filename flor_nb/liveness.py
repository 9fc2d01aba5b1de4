"""Values a checkpoint between two iterations need not store: the loop body recomputes them before any read.

In a step-only loop (makemore: ``for i in range(max_steps): ix = ...; emb = C[Xtr[ix]]; h = ...; logits =
...; for p in parameters: p.grad = None; loss.backward(); ...``) the activations ``emb``, ``h`` and ``logits``
and the parameters' gradients are overwritten by the next iteration before anything reads them, yet they
are as big as the model. :func:`dead_at_unit_start` finds such values, syntactically and conservatively
(it answers "dead" only when every pass through the body assigns or clears them before any read), so
end-of-unit checkpoints can leave them out (their digests are still kept: replay checks them).

In an epoch loop whose step loop clears the gradients first (``for x, y in loader: opt.zero_grad(); ...``),
:func:`dead_through_steps` lets both checkpoints of an epoch, at the step loop's exit and at its end, leave
the gradients out (a quarter of an Adam checkpoint), and the last batch's variables.

Replay runs the same analysis on the edited code (:func:`needs`, :func:`needs_through_steps`): a probe that
reads such a value first makes it live, and the replay then starts from a checkpoint that kept it (or runs
the step loop it would have skipped). Nothing is ever restored from a checkpoint that lacks what the replayed
code reads. Whether a call may read the gradients is judged in :mod:`flor_nb.grad_reads`.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import NamedTuple

from .grad_reads import DYNAMIC, gradient_words, may_read_grads, probe_judge, record_judge, words

_ESCAPES = (ast.Break, ast.Continue, ast.Return, ast.Raise)


@dataclass(frozen=True)
class Dead:
    """What every unit of the loop recomputes before reading it."""

    names: frozenset = frozenset()  # root variables the body assigns before any read
    cleared: tuple = ()  # ("list", name) | ("zero_grad", name): gradients cleared before any read
    clear_line: int | None = None  # line of the statement that clears them (for the probe check at replay)
    reasons: dict = field(default_factory=dict)  # why a candidate is not dead (for diagnostics)
    steps: bool = False  # the clearing is in the step loop: the step-exit state leaves the gradients out too

    def __bool__(self):
        return bool(self.names or self.cleared)

    def to_json(self) -> dict:
        return {"names": sorted(self.names), "cleared": [list(c) for c in self.cleared], "clear_line": self.clear_line,
                **({"steps": True} if self.steps else {})}

    @classmethod
    def from_json(cls, d: dict | None) -> "Dead":
        d = d or {}
        return cls(frozenset(d.get("names", ())), tuple(tuple(c) for c in d.get("cleared", ())), d.get("clear_line"),
                   steps=bool(d.get("steps")))


def _loads(node) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _targets(stmt) -> set[str]:
    """Names an unconditional top-level assignment binds (``h = ...``, ``a, b = ...``)."""
    if isinstance(stmt, ast.Assign):
        targets = stmt.targets
    elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
        targets = [stmt.target]
    else:
        return set()
    out = set()
    for t in targets:
        elts = t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]
        if not all(isinstance(e, ast.Name) for e in elts):
            return set()  # x.attr = / x[i] = : not a plain binding
        out |= {e.id for e in elts}
    return out


def function_reads(sources) -> set[str] | None:
    """Global names read inside functions, lambdas and classes the given sources define (None: the code
    reaches the namespace dynamically, so nothing can be proven dead)."""
    out: set = set()
    for src in sources:
        try:
            tree = ast.parse(src)
        except SyntaxError:
            return None
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in DYNAMIC:
                return None
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                out |= _loads(node)
    return out


def _clearing(stmt):
    """("list", X) for ``for p in X: p.grad = None``; ("zero_grad", X) for ``X.zero_grad()`` (set_to_none,
    the default); else None."""
    if (isinstance(stmt, ast.For) and isinstance(stmt.target, ast.Name) and isinstance(stmt.iter, ast.Name)
            and not stmt.orelse and len(stmt.body) == 1 and isinstance(stmt.body[0], ast.Assign)):
        a = stmt.body[0]
        t = a.targets[0] if len(a.targets) == 1 else None
        if (isinstance(t, ast.Attribute) and t.attr == "grad" and isinstance(t.value, ast.Name)
                and t.value.id == stmt.target.id and isinstance(a.value, ast.Constant) and a.value.value is None):
            return ("list", stmt.iter.id)
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        c = stmt.value
        if (isinstance(c.func, ast.Attribute) and c.func.attr == "zero_grad" and isinstance(c.func.value, ast.Name)
                and not c.args and all(k.arg == "set_to_none" and isinstance(k.value, ast.Constant)
                                       and k.value.value is True for k in c.keywords)):
            return ("zero_grad", c.func.value.id)
    return None


def dead_at_unit_start(loop, reads_in_functions, library_call=None) -> Dead:
    """What the body of ``loop`` (an ``ast.For``) assigns or clears before any read, in every unit.

    ``reads_in_functions``: :func:`function_reads` of the cell and its dependency cells (None: give up).
    ``library_call(call) -> bool``: whether a call cannot read gradients (record time, with the namespace);
    without it, only calls in :data:`SAFE_CALLS` are trusted.
    """
    if not isinstance(loop, ast.For) or loop.orelse or reads_in_functions is None:
        return Dead()
    if any(isinstance(n, ast.Name) and n.id in DYNAMIC for n in ast.walk(loop)):
        return Dead()
    cleared, clear_line, dead = _scan(loop.body, library_call, None, reads_in_functions, _deleted(loop))
    return Dead(frozenset(dead), cleared, clear_line)


def _deleted(node) -> set[str]:
    return {t.id for n in ast.walk(node) if isinstance(n, ast.Delete) for t in n.targets if isinstance(t, ast.Name)}


def _scan(stmts, library_call, forgiven, reads_in_functions, deleted, rename=None) -> tuple[tuple, int | None, set]:
    """(clearings of the gradients before any read of them, line of the last, variables assigned before any read)
    over ``stmts`` run in order, up to the first that may leave them (``continue``, ``break``, ``return``,
    ``raise``). ``reads_in_functions`` None: no variable. ``rename(stmt, clearing)``: the clearing under the
    cell's name (a helper's parameter -> the variable passed for it), None when it has none."""
    read, assigned, dead = set(), set(), set()
    cleared, line, grads_read = [], None, False
    for stmt in stmts:
        clear = None if grads_read else _clearing(stmt)
        if clear is not None and rename is not None:
            clear = rename(stmt, clear)
        read |= _loads(stmt)  # a clearing's too: the list's name, the optimizer's
        if clear is not None:
            cleared.append(clear)
            line = stmt.lineno
            continue
        if not grads_read:
            grads_read = may_read_grads(stmt, library_call, forgiven)
        if reads_in_functions is not None:
            dead |= {n for n in _targets(stmt) - read - assigned if n not in reads_in_functions and n not in deleted}
        assigned |= _targets(stmt)
        if any(isinstance(n, _ESCAPES) for n in ast.walk(stmt)):
            break
    return tuple(cleared), line, dead


def dead_through_steps(epoch, step, library_call, reads_in_functions=None, helper=None) -> Dead:
    """What an epoch loop with a step loop recomputes before reading it, in every epoch: ``Dead(names, cleared,
    line, steps=True)``, else ``Dead()``.

    The gradients, when the step loop clears them first (``for x, y in loader: opt.zero_grad(); ...``), and
    variables the epoch body or the step loop's first pass assign before any read (the last batch's
    ``inputs``, ``outputs``, ``loss``). Both checkpoints of an epoch (at the step loop's exit and at the epoch's
    end) may leave them out: the next epoch recomputes them first, and the code after the step loop, which a
    replay that skips the step loop runs from the step-exit state, reads none of them. (A step loop that runs
    no batch in the next epoch would carry them: replay's state check says so.) ``reads_in_functions``:
    :func:`function_reads` of the cells (None: no variable is left out). ``helper``: the :class:`Helper` whose
    body holds ``step``.
    """
    scan = _scan_through_steps(epoch, step, library_call, library_call, reads_in_functions, helper)
    if scan is None:
        return Dead()
    cleared = () if scan.tail_grads else scan.cleared
    names = frozenset(scan.names - scan.tail_names)
    if not cleared and not names:
        return Dead()
    return Dead(names, cleared, scan.clear_line if cleared else None, steps=True)


@dataclass
class _Scan:
    cleared: tuple  # clearings of the gradients before any read of them
    clear_line: int | None
    names: set  # variables assigned before any read, from the epoch's start through the step loop's first pass
    tail_grads: bool  # the code after the step loop may read the gradients
    tail_names: set  # variables it reads


def _scan_through_steps(epoch, step, library_call, forgiven, reads_in_functions, helper=None) -> _Scan | None:
    """Scan the epoch body up to the step loop, then the step loop's header and first pass, then the code after
    it; None for a shape this does not judge (the step loop not a statement of the epoch body or of the
    ``helper`` (:class:`Helper`) it calls, an ``else:``, dynamic names)."""
    if not (isinstance(epoch, ast.For) and isinstance(step, ast.For)) or epoch.orelse or step.orelse:
        return None
    if any(isinstance(n, ast.Name) and n.id in DYNAMIC for n in ast.walk(epoch)):
        return None
    header = ast.Assign(targets=[step.target], value=step.iter, lineno=step.lineno, end_lineno=step.lineno)
    if helper is not None:
        return _scan_helper(epoch, step, header, helper, library_call, forgiven, reads_in_functions)
    at = next((j for j, stmt in enumerate(epoch.body) if stmt is step), None)
    if at is None:
        return None
    cleared, line, dead = _scan([*epoch.body[:at], header, *step.body], library_call, forgiven, reads_in_functions,
                                _deleted(epoch))
    tail = epoch.body[at + 1:]
    return _Scan(cleared, line, dead, any(may_read_grads(stmt, library_call, forgiven) for stmt in tail),
                 {n for stmt in tail for n in _loads(stmt)})


# -- the step loop inside a helper the epoch loop calls (pytorch/examples' MNIST: train(args, model, ...)) ------
class Helper(NamedTuple):
    """A function of the cells whose step loop is the run's, called once per epoch by a statement of the body."""

    fn: ast.FunctionDef
    at: int  # index of the calling statement in the epoch body
    bound: dict  # the helper's parameter -> the cell's variable passed for it
    local: frozenset  # the helper's local names


def find_helper(epoch, choice: dict, sources) -> tuple[Helper, ast.For] | None:
    """(:class:`Helper`, its step loop) of a run whose step loop is in a helper (``choice["helper"]``, from
    :func:`flor_nb.edits.find_helper`), from the last of ``sources`` that defines it; None for a shape this
    does not judge: the call not a whole statement of the epoch body (``train(...)``, ``loss = train(...)``),
    the helper named twice in the epoch loop, ``*args`` at the call, the step loop not a statement of the
    helper's body."""
    from .edits import _top_defs, call_binding
    from .instrument import _fors, _hinted

    want = (choice or {}).get("helper")
    if not want or not isinstance(epoch, ast.For):
        return None
    fn = None
    for src in sources:
        fn = _top_defs(src).get(want["name"], fn)
    if not isinstance(fn, ast.FunctionDef):
        return None
    step = _hinted(list(_fors(fn.body, into_loops=True)), want)
    if not isinstance(step, ast.For) or not any(stmt is step for stmt in fn.body):
        return None
    if sum(isinstance(n, ast.Name) and n.id == want["name"] for n in ast.walk(epoch)) != 1:
        return None
    at = next((j for j, stmt in enumerate(epoch.body) if isinstance(stmt, (ast.Expr, ast.Assign))
               and isinstance(stmt.value, ast.Call) and isinstance(stmt.value.func, ast.Name)
               and stmt.value.func.id == want["name"]), None)
    if at is None:
        return None
    call = epoch.body[at].value
    bound = None if any(k.arg is None for k in call.keywords) else call_binding(fn, call)
    if bound is None:
        return None
    return Helper(fn, at, bound, frozenset(_local_names(fn))), step


def _local_names(fn) -> set[str]:
    """Names local to ``fn``: its parameters and what its body binds, but ``global``/``nonlocal`` ones (a superset:
    names bound in nested functions count too)."""
    a = fn.args
    params = {x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, *(v for v in (a.vararg, a.kwarg) if v))}
    declared = {n for node in ast.walk(fn) if isinstance(node, (ast.Global, ast.Nonlocal)) for n in node.names}
    stored = {n.id for node in fn.body for n in ast.walk(node) if isinstance(n, ast.Name)
              and isinstance(n.ctx, (ast.Store, ast.Del))}
    stored |= {n.name for node in fn.body for n in ast.walk(node)
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    return (params | stored) - declared


def _root(call) -> str | None:
    f = call.func
    while isinstance(f, (ast.Attribute, ast.Subscript, ast.Call)):
        f = f.func if isinstance(f, ast.Call) else f.value
    return f.id if isinstance(f, ast.Name) else None


def _scan_helper(epoch, step, header, h: Helper, library_call, forgiven, reads_in_functions) -> _Scan | None:
    """:func:`_scan_through_steps` for a step loop in a helper: the epoch body up to the call, the call's
    arguments, the helper's body up to its step loop, its header and first pass; the tail is the helper's body
    after the step loop and the epoch body after the call. Variables are the cell's only (the helper's die with
    it); a clearing under a parameter's name counts under the cell's variable passed for it."""
    if any(isinstance(n, ast.Name) and n.id in DYNAMIC for n in ast.walk(h.fn)):
        return None
    k = next(j for j, stmt in enumerate(h.fn.body) if stmt is step)
    stmt = epoch.body[h.at]
    call = stmt.value
    args = ast.Expr(value=ast.Tuple(elts=[*call.args, *(kw.value for kw in call.keywords)], ctx=ast.Load()),
                    lineno=stmt.lineno, end_lineno=stmt.end_lineno)
    inside = {id(n) for node in h.fn.body for n in ast.walk(node)}

    def rename(where, clear):
        how, name = clear
        if id(where) not in inside or name not in h.local:
            return clear
        return (how, h.bound[name]) if name in h.bound else None

    cell_pre = [*epoch.body[:h.at], args]
    if isinstance(stmt, ast.Assign):  # loss = train(...): bound once the helper returns
        cell_pre.append(ast.Assign(targets=stmt.targets, value=ast.Constant(None), lineno=stmt.lineno,
                                   end_lineno=stmt.end_lineno))
    _, _, dead = _scan(cell_pre, library_call, forgiven, reads_in_functions, _deleted(epoch))
    cleared, line, _ = _scan([*epoch.body[:h.at], args, *h.fn.body[:k], header, *step.body], library_call, forgiven,
                             None, set(), rename)
    tail = [*h.fn.body[k + 1:], *epoch.body[h.at + 1:]]
    return _Scan(cleared, line, dead, any(may_read_grads(s, library_call, forgiven) for s in tail),
                 {n for s in tail for n in _loads(s)})


def helper_judge(h: Helper, cell_judge, local_judge, bound_judge):
    """``library_call`` for a cell and its helper: calls in the helper on a parameter go to ``bound_judge`` (the
    namespace with the parameters bound to what the cell passed), on another local to ``local_judge`` (no object
    to look at), the rest to ``cell_judge``."""
    inside = {id(n) for node in h.fn.body for n in ast.walk(node)}

    def judge(call) -> bool:
        if id(call) not in inside:
            return cell_judge(call)
        root = _root(call)
        if root in h.bound:
            return bound_judge(call)
        if root in h.local or root is None:
            return local_judge(call)
        return cell_judge(call)

    return judge


def needs(recorded: Dead, loop, reads_in_functions, added_lines=()) -> tuple[set, bool]:
    """What the edited loop ``loop`` reads of what recording left out: (names, gradients?).

    ``added_lines``: line numbers of the edited cell that are probes (not recorded code).
    """
    if not recorded:
        return set(), False
    # Calls in the recorded statements were judged at record time, with the namespace: trusted here; the
    # probe lines before the clearing are checked below.
    now = dead_at_unit_start(loop, reads_in_functions, lambda call: True) if loop is not None else Dead()
    names = set(recorded.names - now.names)
    grads = False
    if recorded.cleared:
        if loop is None or tuple(now.cleared) != tuple(recorded.cleared):
            grads = True
        else:  # the recorded statements before the clearing were judged with the namespace: check the probes
            added = set(added_lines)
            for stmt in loop.body:
                if _clearing(stmt) is not None:
                    break
                lines = set(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
                if lines & added and may_read_grads(stmt, None):
                    grads = True
                    break
    return names, grads


class Needs(NamedTuple):
    """What an edited cell reads of what recording left out."""

    names: set  # variables it reads before the body recomputes them: checkpoints that left them out are not entered
    grads: bool  # the gradients, likewise
    tail: tuple = ()  # what the code after the step loop reads of what step-exit states left out (``Dead.steps``)


def needs_through_steps(recorded: Dead, epoch, step, sources, added_lines=(), helper=None, helper_added=(),
                        holders=frozenset()) -> Needs:
    """:class:`Needs` of an edited cell whose recording left values out at both points of an epoch (``Dead.steps``):
    read before they are recomputed, no checkpoint that left them out can be entered; read after the step loop,
    an epoch whose step-exit state left them out runs its step loop.

    The recorded statements were judged at record time, with the namespace; the probe lines
    (``added_lines``; ``helper_added`` in the ``helper``'s cell) are judged here, from the cells' code
    (:func:`probe_judge`; ``holders``: the variables that hold gradients)."""
    grads_word = ("the gradients",) if recorded.cleared else ()
    everything = Needs(set(recorded.names), bool(recorded.cleared), grads_word + tuple(sorted(recorded.names)))
    if epoch is None or step is None:
        return everything
    added, in_helper = set(added_lines), set(helper_added)
    inside = {id(n) for node in helper.fn.body for n in ast.walk(node)} if helper is not None else set()

    def recorded_line(call) -> bool:
        lines = set(range(call.lineno, (call.end_lineno or call.lineno) + 1))
        return not (lines & (in_helper if id(call) in inside else added))

    probe = probe_judge(sources, holders | {name for _, name in recorded.cleared})
    scan = _scan_through_steps(epoch, step, lambda c: recorded_line(c) or probe(c), recorded_line,
                               function_reads(sources), helper)
    if scan is None:
        return everything
    names = set(recorded.names)
    tail = (grads_word if scan.tail_grads else ()) + tuple(sorted(names & scan.tail_names))
    return Needs(names - scan.names, not set(recorded.cleared) <= set(scan.cleared), tail)


# -- record time: the loop in the cell, with the namespace to judge calls ---------------------------------
def for_record(code: str, choice: dict, sources, ns: dict) -> Dead:
    """:func:`dead_at_unit_start` for the recorded cell, once a unit has run (the body's names are bound)."""
    epoch, step = _loops(code, choice)
    if epoch is None:
        return Dead()
    reads = function_reads([code, *sources])
    if choice.get("helper"):
        found = find_helper(epoch, choice, sources)
        if found is None:
            return Dead()
        h, step = found
        bound = dict(ns)
        for param, var in h.bound.items():  # a parameter is the object passed for it; unknown ones are not judged
            if var in ns:
                bound[param] = ns[var]
            else:
                bound.pop(param, None)
        judge = helper_judge(h, record_judge(ns), probe_judge([code, *sources]), record_judge(bound))
        return dead_through_steps(epoch, step, judge, reads, h)
    if step is not None:
        return dead_through_steps(epoch, step, record_judge(ns), reads)
    return dead_at_unit_start(epoch, reads, record_judge(ns))


def for_replay(recorded: Dead, code: str, recorded_code: str, choice: dict, sources, edited=(),
               recorded_sources=None, holders=frozenset()) -> Needs:
    """What an edited cell reads of what recording left out (:class:`Needs`).

    ``edited``: sources of dependency cells edited for this replay. The calls before the clearing were
    judged with the recorded functions; an edited one that mentions gradients may now read them first.
    ``recorded_sources``: the dependency cells as recorded (the lines a helper with the step loop gained are
    probes; without them, every line of it is judged as one). ``holders``: the recorded modules and optimizers."""
    from .edits import added_lines

    added = added_lines(recorded_code, code)
    helper = (choice or {}).get("helper")
    if recorded.steps:
        epoch, step = _loops(code, choice)
        found = find_helper(epoch, choice, sources) if helper else None
        if helper and found is None:
            step = None
        in_helper = ()
        if found is not None:
            step = found[1]
            was = _defining(recorded_sources or (), helper["name"])
            fn = found[0].fn
            in_helper = added_lines(was, _defining(sources, helper["name"])) if was is not None else \
                range(fn.lineno, fn.end_lineno + 1)
        out = needs_through_steps(recorded, epoch, step, [code, *sources], added, found and found[0], in_helper,
                                  frozenset(holders))
    else:
        out = Needs(*needs(recorded, _epoch_loop(code, choice), function_reads([code, *sources]), added))
    # The helper's own lines are judged above; the rest of an edited cell may be called anywhere.
    if recorded.cleared and any(gradient_words(_words_but(src, helper and helper["name"])) for src in edited):
        out = out._replace(grads=True)
    return out


def _defining(sources, name: str) -> str | None:
    """The last of ``sources`` that defines function ``name`` at its top level."""
    from .edits import _top_defs

    return next((src for src in reversed(list(sources)) if name in _top_defs(src)), None)


def _words_but(src: str, name) -> set[str]:
    """:func:`words` of a cell but its top-level function ``name``."""
    tree = ast.parse(src)
    return words(ast.Module(body=[n for n in tree.body if not (isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                                                                and n.name == name)], type_ignores=[]))


def _epoch_loop(code: str, choice: dict):
    return _loops(code, choice)[0]


def _loops(code: str, choice: dict):
    """(epoch loop, step loop or None) of the cell; (None, None) when the epoch loop is not a plain ``for``."""
    from .instrument import _find

    try:
        epoch, step = _find(ast.parse(code), "cell", hint=choice)[:2]
    except Exception:  # noqa: BLE001 - no loop found: nothing is dead
        return None, None
    return (epoch, step if isinstance(step, ast.For) else None) if isinstance(epoch, ast.For) else (None, None)


