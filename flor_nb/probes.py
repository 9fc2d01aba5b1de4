"""Probes: log statements added to a recorded cell before a replay.

A :class:`Probe` is code inserted after a line of the recorded training cell.
This module turns a list of probes into the edited cell that
:func:`flor_nb.replay` runs, checks them for syntax errors and undefined names
before anything runs, offers presets (gradient norm, learning rate, ...) as
plain PyTorch code, remembers each run's probes in the store, and describes what
a replay would do. The replay panel (``flor_nb.widgets``) is a view over this
module and :func:`flor_nb.replay`; everything here works without a kernel.
"""
from __future__ import annotations

import ast
import builtins
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .cells import analyze
from .errors import FlorError, ProbeSyntaxError
from .instrument import instrument, parse, recorded_loops
from .plan import format_epochs

# -- probes -----------------------------------------------------------------


@dataclass
class Probe:
    """Code inserted after line ``line`` of the recorded cell (0: before the first line).

    ``indent`` is the number of spaces to indent it by; None picks the indentation
    of the statement at ``line`` (or of the block it opens).
    """

    line: int
    code: str
    preset: str = "code"
    params: dict = field(default_factory=dict)
    indent: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Probe:
        return cls(int(d["line"]), d["code"], d.get("preset", "code"), dict(d.get("params") or {}), d.get("indent"))

    @property
    def title(self) -> str:
        """A short label: the names it logs, else its first line."""
        names = logged_names(self.code)
        return ", ".join(names) if names else self.code.strip().splitlines()[0][:60]


@dataclass
class Problem:
    """Something wrong with a probe, found before replay: where, and what to do."""

    probe: int  # index into the probe list; -1 for the edited cell as a whole
    line: int  # line of the recorded cell the probe follows
    kind: str  # "syntax", "name" or "loop"
    message: str

    def __str__(self):
        return f"Probe at line {self.line}: {self.message}"


def logged_names(code: str) -> list[str]:
    """The literal names passed to ``flor.log(...)`` in ``code`` (f-strings show their prefix)."""
    try:
        tree = ast.parse(_dedent(code))
    except SyntaxError:
        return re.findall(r"flor\.log\(\s*f?[\"']([^\"']+)", code)
    out = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "log"
                and node.args):
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                out.append(arg.value)
            elif isinstance(arg, ast.JoinedStr):
                out.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in arg.values))
    return list(dict.fromkeys(out))


def _dedent(code: str) -> str:
    lines = code.expandtabs(4).splitlines()
    pad = min((len(s) - len(s.lstrip()) for s in lines if s.strip()), default=0)
    return "\n".join(s[pad:] for s in lines)


def _indent_of(text: str) -> int:
    text = text.expandtabs(4)
    return len(text) - len(text.lstrip())


def _statements(tree: ast.Module):
    """Every statement with the list of compound statements enclosing it (outermost first)."""
    def walk(stmts, parents):
        for stmt in stmts:
            yield stmt, parents
            for name in ("body", "orelse", "finalbody"):
                yield from walk(getattr(stmt, name, None) or [], parents + [stmt])
            for handler in getattr(stmt, "handlers", None) or []:
                yield from walk(handler.body, parents + [stmt])
            for case in getattr(stmt, "cases", None) or []:
                yield from walk(case.body, parents + [stmt])

    yield from walk(tree.body, [])


def _is_block(stmt) -> bool:
    return any(getattr(stmt, name, None) for name in ("body", "handlers", "cases"))


def _header_end(stmt) -> int:
    """Last line of a compound statement's header (``for x in (...):`` may span lines)."""
    first = (stmt.body or stmt.handlers)[0] if hasattr(stmt, "body") else stmt.cases[0]
    return first.lineno - 1 if first.lineno > stmt.lineno else stmt.lineno


def insertion_point(code: str, line: int) -> tuple[int, int, list[tuple[str, int]]]:
    """Where a probe asked for after ``line`` really goes: (after_line, default indent, levels).

    A line inside a multi-line statement moves to the statement's end. ``levels``
    lists the indentations that keep the cell valid there, with a label each
    (e.g. ``("inside for xb, yb in loader:", 8)``).
    """
    lines = code.splitlines()
    line = max(0, min(int(line), len(lines)))
    if line == 0:
        return 0, 0, [("top of the cell", 0)]
    tree = parse(code, "recorded cell")
    after, indent, parents = line, None, []
    for stmt, ps in _statements(tree):
        if _is_block(stmt):
            if stmt.lineno <= line <= _header_end(stmt):
                body = (stmt.body or stmt.handlers) if hasattr(stmt, "body") else stmt.cases
                after, indent, parents = _header_end(stmt), _indent_of(lines[body[0].lineno - 1]), ps + [stmt]
        elif stmt.lineno <= line <= (stmt.end_lineno or stmt.lineno):
            after, indent, parents = stmt.end_lineno or stmt.lineno, _indent_of(lines[stmt.lineno - 1]), ps
    if indent is None:  # a blank or comment line: take the next statement's indentation
        following = [_indent_of(s) for s in lines[line:] if s.strip() and not s.strip().startswith("#")]
        before = [_indent_of(s) for s in lines[:line] if s.strip() and not s.strip().startswith("#")]
        indent = following[0] if following else (before[-1] if before else 0)
    nxt = [_indent_of(s) for s in lines[after:] if s.strip() and not s.strip().startswith("#")]
    floor = nxt[0] if nxt else 0
    levels = [(_block_label(p, lines), _indent_of(lines[_body_line(p) - 1])) for p in parents]
    levels = [("top of the cell", 0)] + levels
    valid = [(label, ind) for label, ind in levels if ind == indent or (floor <= ind < indent)]
    if not any(ind == indent for _, ind in valid):
        valid.append(("here", indent))
    return after, indent, sorted(valid, key=lambda x: -x[1])


def _body_line(stmt) -> int:
    body = (stmt.body or stmt.handlers) if hasattr(stmt, "body") else stmt.cases
    return body[0].lineno


def _block_label(stmt, lines) -> str:
    head = lines[stmt.lineno - 1].strip()
    return f"inside {head[:50]}"


def apply(code: str, probes: list[Probe]) -> tuple[str, list[tuple[int, int]]]:
    """The edited cell: ``code`` with every probe inserted.

    Returns the edited source and, per probe, the 1-based (first, last) lines it
    occupies in it. Probes at the same line keep their order.
    """
    lines = code.splitlines()
    placed = []
    for i, probe in enumerate(probes):
        after, indent, _ = insertion_point(code, probe.line)
        if probe.indent is not None:
            indent = int(probe.indent)
        body = [(" " * indent + s) if s.strip() else "" for s in _dedent(probe.code).splitlines()] or [" " * indent + "pass"]
        placed.append((after, i, body))
    out, spans = [], [None] * len(probes)
    by_line: dict[int, list] = {}
    for after, i, body in placed:
        by_line.setdefault(after, []).append((i, body))

    def emit(after):
        for i, body in by_line.get(after, []):
            spans[i] = (len(out) + 1, len(out) + len(body))
            out.extend(body)

    emit(0)
    for n, text in enumerate(lines, start=1):
        out.append(text)
        emit(n)
    for after in sorted(k for k in by_line if k > len(lines)):
        emit(after)
    edited = "\n".join(out) + ("\n" if code.endswith("\n") else "")
    return edited, spans


# -- checking ---------------------------------------------------------------

_KNOWN = set(dir(builtins)) | {"flor", "__name__", "__file__", "__builtins__"}


def known_names(run) -> tuple[set[str], bool]:
    """Names a probe may use in ``run``'s replay, and whether that list is complete.

    Known: builtins, ``flor``, names bound by the run's dependency cells and names
    the recorded cell assigns. A dependency with ``from x import *`` makes the
    list incomplete (undefined names are then not reported).
    """
    names = set(_KNOWN)
    complete = True
    for cell in run.deps:
        names |= set(cell.get("bound") or ())
        try:
            tree = ast.parse(cell["source"])
            names |= analyze(cell["source"])[1]
        except SyntaxError:
            complete = False
            continue
        if any(isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names) for n in ast.walk(tree)):
            complete = False
    names |= analyze(run.code)[1]
    return names, complete


def check(run, probes: list[Probe]) -> list[Problem]:
    """Problems with ``probes`` for ``run``: syntax errors, undefined names, a loop that would move.

    Nothing runs. Each problem names the recorded line the probe follows.
    """
    problems: list[Problem] = []
    names, complete = known_names(run)
    good = []
    for i, probe in enumerate(probes):
        try:
            tree = parse(_dedent(probe.code), "probe")
        except ProbeSyntaxError as e:
            problems.append(Problem(i, probe.line, "syntax", _first_line(str(e)) + f" (probe line {e.lineno})"))
            continue
        good.append(i)
        if any(isinstance(n, (ast.For, ast.AsyncFor, ast.While)) for n in tree.body):
            problems.append(Problem(i, probe.line, "loop", (
                "a for/while statement in a probe can be taken for the epoch or step loop; "
                "use a comprehension, e.g. [flor.log(f'w/{n}', p.norm()) for n, p in model.named_parameters()]")))
        free, _ = analyze(_dedent(probe.code))
        missing = sorted(free - names) if complete else []
        if missing:
            problems.append(Problem(i, probe.line, "name", (
                f"name{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                f"{'are' if len(missing) > 1 else 'is'} not defined in the recorded cell or the cells it depends on")))
    if problems:
        return problems
    edited, spans = apply(run.code, probes)
    try:
        _, loops = instrument(edited, what="edited cell", hint=_hint(run))
    except ProbeSyntaxError as e:
        # the probe holding the bad line, or the one just before it (a dedent breaks the next line)
        owner = next((i for i, s in enumerate(spans) if s and s[0] <= (e.lineno or 0) <= s[1] + 1), None)
        line = probes[owner].line if owner is not None else _recorded_line(spans, probes, e.lineno or 0)
        problems.append(Problem(owner if owner is not None else -1, line, "syntax",
                                _first_line(str(e)).replace("edited cell", "cell with the probe") +
                                " (check the probe's indentation)"))
        return problems
    _, was = instrument(run.code, what="recorded cell", hint=_hint(run))
    shift = _line_map(spans, len(run.code.splitlines()))
    if shift.get(was.epoch_line) != loops.epoch_line or (
            was.step_line and shift.get(was.step_line) != loops.step_line):
        problems.append(Problem(-1, 0, "loop", "a probe changes which loop is the epoch or step loop; "
                                               "write probes without for/while statements"))
    return problems


def _first_line(message: str) -> str:
    return message.splitlines()[0]


def _line_map(spans, n_lines) -> dict[int, int]:
    """Recorded line -> edited line."""
    inserted = sorted(s for s in spans if s)
    out, added, k = {}, 0, 0
    for line in range(1, n_lines + 1):
        while k < len(inserted) and inserted[k][0] <= line + added:
            added += inserted[k][1] - inserted[k][0] + 1
            k += 1
        out[line] = line + added
    return out


def _recorded_line(spans, probes, edited_line) -> int:
    before = [probes[i].line for i, s in enumerate(spans) if s and s[1] < edited_line]
    return max(before, default=0)


def edited_code(run, probes: list[Probe]) -> str:
    """The cell to pass to :func:`flor_nb.replay`; raises :class:`ProbeError` listing every problem."""
    problems = check(run, probes)
    if problems:
        raise ProbeError("; ".join(map(str, problems)) + ".", problems)
    return apply(run.code, probes)[0]


class ProbeError(FlorError):
    """Probes that would fail before or at replay; ``.problems`` says where."""

    def __init__(self, message, problems=()):
        super().__init__(message, list(problems))
        self.problems = list(problems)

    def __str__(self):
        return self.args[0]


def in_step_loop(run, probes: list[Probe]) -> list[bool]:
    """Per probe: does it run inside the step loop of the recorded cell?"""
    _, loops = instrument(run.code, what="recorded cell", hint=_hint(run))
    if loops.step_line is None:
        return [False] * len(probes)
    tree = parse(run.code)
    step = _loop_at(tree, loops.step_line)
    step_indent = _indent_of(run.code.splitlines()[_body_line(step) - 1])
    out = []
    for probe in probes:
        after, indent, _ = insertion_point(run.code, probe.line)
        indent = indent if probe.indent is None else probe.indent
        out.append(step.lineno <= after <= step.end_lineno and indent >= step_indent)
    return out


# -- presets ----------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    key: str
    title: str
    template: str
    where: str  # "backward", "step_start", "epoch_end" or "before_loop": where it goes by default
    params: tuple = ()  # parameter names the template uses
    note: str = ""


PRESETS = {p.key: p for p in [
    Preset("grad_norm", "Gradient norm",
           'flor.log("{name}", sum(p.grad.detach().norm() ** 2 for p in {model}.parameters()\n'
           '                      if p.grad is not None) ** 0.5)',
           "backward", ("name", "model"), "after loss.backward(), inside the step loop"),
    Preset("weight_norm", "Weight norm",
           'flor.log("{name}", sum(p.detach().norm() ** 2 for p in {model}.parameters()) ** 0.5)',
           "epoch_end", ("name", "model")),
    Preset("weight_hist", "Weight histogram per layer",
           'flor.log("{name}", {{n: {{"min": p.detach().min().item(), "max": p.detach().max().item(),\n'
           '                     "counts": p.detach().float().histc(bins=20).tolist()}}\n'
           '                 for n, p in {model}.named_parameters()}})',
           "epoch_end", ("name", "model")),
    Preset("grad_hist", "Gradient histogram per layer",
           'flor.log("{name}", {{n: {{"min": p.grad.min().item(), "max": p.grad.max().item(),\n'
           '                     "counts": p.grad.float().histc(bins=20).tolist()}}\n'
           '                 for n, p in {model}.named_parameters() if p.grad is not None}})',
           "backward", ("name", "model"), "after loss.backward(); logs every step"),
    Preset("lr", "Learning rate",
           'flor.log("{name}", {optimizer}.param_groups[0]["lr"])',
           "epoch_end", ("name", "optimizer")),
    Preset("activation", "Activation mean/std (forward hook)",
           'if not hasattr({model}.get_submodule("{module}"), "_flor_hook_{slug}"):  # once, at the first step\n'
           '    def _flor_hook_{slug}(mod, inputs, output):\n'
           '        flor.log("{name}.mean", output.detach().float().mean())\n'
           '        flor.log("{name}.std", output.detach().float().std())\n'
           '    {model}.get_submodule("{module}")._flor_hook_{slug} = (\n'
           '        {model}.get_submodule("{module}").register_forward_hook(_flor_hook_{slug}))',
           "step_start", ("name", "model", "module"),
           "registers a forward hook at the first replayed step; logs every forward call of the module"),
    Preset("class_acc", "Per-class accuracy",
           'flor.log("{name}", {{int(c): float((pred[{labels} == c] == c).float().mean())\n'
           '                 for pred in [({outputs}).detach().argmax(1)] for c in {labels}.unique()}})',
           "epoch_end", ("name", "outputs", "labels"),
           "runs one extra forward pass: place it where the model is in eval mode, or use existing outputs"),
]}

DEFAULT_NAMES = {"grad_norm": "grad_norm", "weight_norm": "weight_norm", "weight_hist": "weight_hist",
                 "grad_hist": "grad_hist", "lr": "lr", "activation": "act", "class_acc": "class_acc"}


def objects(run, store=None) -> dict[str, dict]:
    """Stateful objects of ``run`` from its first checkpoint: ``{name: {"kind", "modules"}}``.

    ``kind`` is ``module``, ``optimizer`` or ``other``; ``modules`` lists a
    module's submodules that hold parameters or buffers (``""`` is the module itself).
    """
    from . import checkpoint
    from .api import get_store

    st = get_store(store)
    ckpts = st.checkpoints(run.id)
    if not ckpts:
        return {}
    snap = checkpoint.read(st.home, ckpts[min(ckpts)]["path"])  # the first: state before the epoch loop
    out = {}
    for key, value in snap["tensors"].items():
        kind, _, path = key.partition("/")
        if kind != "obj" or not isinstance(value, dict):
            continue
        if f"train/{path}" in snap["python"]:
            mods = sorted({k.rpartition(".")[0] for k in value},
                          key=lambda m: [(0, int(x), "") if x.isdigit() else (1, 0, x) for x in m.split(".")])
            out[path] = {"kind": "module", "modules": [""] + [m for m in mods if m]}
        elif "param_groups" in value:
            out[path] = {"kind": "optimizer", "modules": []}
        else:
            out[path] = {"kind": "other", "modules": []}
    return out


def preset_defaults(run, key: str, objs: dict | None = None) -> dict:
    """Parameters for preset ``key`` guessed from the run: its model, optimizer, batch names."""
    objs = objs or {}
    model = next((n for n, o in objs.items() if o["kind"] == "module"), "model")
    optimizer = next((n for n, o in objs.items() if o["kind"] == "optimizer"), "optimizer")
    modules = objs.get(model, {}).get("modules") or [""]
    module = modules[1] if len(modules) > 1 else ""
    inputs, labels = _eval_names(run.code, model, _hint(run)) or _batch_names(run.code, _hint(run))
    params = {"name": DEFAULT_NAMES.get(key, key), "model": model, "optimizer": optimizer, "module": module,
              "outputs": f"{model}({inputs})", "labels": labels}
    if key == "activation":
        params["name"] = f"act.{module}" if module else "act"
    return {k: params[k] for k in PRESETS[key].params}


def _eval_names(code: str, model: str, hint=None) -> tuple[str, str] | None:
    """Names of an epoch-level evaluation outside the step loop: ``(model(X).argmax(1) == y)`` -> ("X", "y")."""
    try:
        _, loops = instrument(code, hint=hint)
    except FlorError:
        return None
    tree = parse(code)
    epoch = _loop_at(tree, loops.epoch_line)
    step = _loop_at(tree, loops.step_line) if loops.step_line else None
    inputs = labels = None
    for node in ast.walk(epoch):
        if step is not None and step.lineno <= getattr(node, "lineno", 0) <= step.end_lineno:
            continue
        if (inputs is None and isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == model and len(node.args) == 1 and isinstance(node.args[0], ast.Name)):
            inputs = node.args[0].id
        if (labels is None and isinstance(node, ast.Compare) and len(node.comparators) == 1
                and isinstance(node.comparators[0], ast.Name) and "argmax" in ast.unparse(node.left)):
            labels = node.comparators[0].id
    return (inputs, labels) if inputs and labels else None


def _batch_names(code: str, hint=None) -> tuple[str, str]:
    """The step loop's (inputs, labels) names, e.g. ``for xb, yb in loader`` -> ("xb", "yb")."""
    try:
        _, loops = instrument(code, hint=hint)
    except FlorError:
        return "x", "y"
    if loops.step_line:
        t = _loop_at(parse(code), loops.step_line).target
        if isinstance(t, ast.Tuple) and len(t.elts) >= 2 and all(isinstance(e, ast.Name) for e in t.elts[:2]):
            return t.elts[0].id, t.elts[1].id
    return "x", "y"


def preset(run, key: str, params: dict | None = None, line: int | None = None, objs: dict | None = None,
           store=None) -> Probe:
    """A :class:`Probe` from preset ``key`` with ``params`` filled in, at ``line`` or its default place.

    Parameters not given are guessed from the run (``objs``: :func:`objects`, read if None).
    """
    if key not in PRESETS:
        raise FlorError(f"Unknown probe preset {key!r}. Presets: {', '.join(PRESETS)}.")
    framework = (_hint(run) or {}).get("framework")
    if framework:  # no loop in the cell to place a preset in: the framework runs the steps
        raise FlorError(f"Run {run.label} trains with `{framework['call']}(...)`, so preset probes have no loop to go "
                        "in. Write flor.log in compute_loss / training_step or in a callback, and replay with "
                        "flor.replay(run, cells={count: edited_source}) or a pasted cell that adds the callback.")
    if objs is None:
        try:
            objs = objects(run, store)
        except (FlorError, OSError, RuntimeError):
            objs = {}
    p = PRESETS[key]
    values = {**preset_defaults(run, key, objs), **(params or {})}
    values["slug"] = re.sub(r"\W", "_", values.get("module") or "model") or "model"
    code = p.template.format(**values)
    indent = None
    if line is None:
        line, indent = default_place(run.code, p.where, _hint(run))
    return Probe(line=line, code=code, preset=key, params={k: values[k] for k in p.params}, indent=indent)


def default_place(code: str, where: str, hint=None) -> tuple[int, int | None]:
    """(line, indent) a preset goes after: ``backward``, ``step_start``, ``epoch_end`` or ``before_loop``.

    ``indent`` is None where the statement at the line decides it.
    """
    _, loops = instrument(code, hint=hint)
    tree = parse(code)
    epoch = _loop_at(tree, loops.epoch_line)
    lines = code.splitlines()
    if where == "before_loop":
        return epoch.lineno - 1, _indent_of(lines[epoch.lineno - 1])
    if where == "step_start" and loops.step_line:
        return _header_end(_loop_at(tree, loops.step_line)), None
    if where in ("backward", "step_start"):
        for stmt, _ in _statements(tree):
            if not _is_block(stmt) and epoch.lineno < stmt.lineno <= epoch.end_lineno and ".backward(" in ast.unparse(stmt):
                return stmt.end_lineno, None
        if loops.step_line:
            return _loop_at(tree, loops.step_line).end_lineno, None
    # after the epoch body's last statement, at the epoch body's indentation (not inside a trailing if)
    return epoch.end_lineno, _indent_of(lines[epoch.body[0].lineno - 1])


def _hint(run) -> dict | None:
    """The loops ``run`` recorded with (see :meth:`flor_nb.instrument.Loops.choice`)."""
    return recorded_loops(getattr(run, "state", None))


def _loop_at(tree, line):
    return next(s for s, _ in _statements(tree) if s.lineno == line and isinstance(s, (ast.For, ast.AsyncFor)))


# -- remembering a run's probes --------------------------------------------


def probes_path(store, run) -> Path:
    return Path(store.home) / "probes" / f"{run.name}@{run.version}.json"


def save(run, probes: list[Probe], store=None) -> Path:
    """Remember ``probes`` for ``run`` (``<store>/probes/NAME@VERSION.json``)."""
    from .api import get_store

    st = get_store(store)
    path = probes_path(st, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"run": run.label, "probes": [p.to_dict() for p in probes]}, indent=1))
    os.replace(tmp, path)
    return path


def load(run, store=None) -> list[Probe]:
    """The probes remembered for ``run`` (an empty list if none)."""
    from .api import get_store

    path = probes_path(get_store(store), run)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [Probe.from_dict(d) for d in data.get("probes", [])]


# -- what a replay will do ------------------------------------------------


def recorded(run, store=None):
    """The run's recorded values, long: one row per (name, epoch, step, seq) with a ``value``."""
    import pandas as pd

    from .api import decode_value, get_store

    st = get_store(store)
    rows = [{"name": r["name"], "epoch": r["epoch"], "step": r["step"], "seq": r["seq"],
             "value": decode_value(r["value"], st)} for r in st.logs([run.id], kind="recorded")]
    return pd.DataFrame(rows, columns=["name", "epoch", "step", "seq", "value"])


def runs_table(store=None):
    """:func:`flor_nb.runs` plus the last recorded value of each scalar metric (``last.NAME``)."""
    from .api import decode_value, get_store, runs

    st = get_store(store)
    table = runs(st)
    last: dict = {}
    for r in st.logs(None, kind="recorded"):
        last.setdefault(r["run_id"], {})[r["name"]] = r["value"]
    ids = {(r.name, r.version): r.id for r in st.all_runs()}
    extra = []
    for name, version in zip(table["name"], table["version"]):
        values = {}
        for metric, text in last.get(ids[(name, version)], {}).items():
            v = decode_value(text, st)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                values[f"last.{metric}"] = v
        extra.append(values)
    cols = sorted({c for e in extra for c in e})
    for c in cols:
        table[c] = [e.get(c) for e in extra]
    return table


def estimate(run, probes: list[Probe], epochs=None, workers=None, store=None) -> dict:
    """What a replay of ``epochs`` with ``probes`` will do and how long it should take.

    Runs nothing. Returns :func:`flor_nb.replay.prepare`'s plan plus ``text``,
    one paragraph for a person, ``step_loop``: whether and why the step loop runs,
    and ``order``: the epochs in the order the workers will report them.
    """
    from .api import get_store
    from .replay import prepare

    st = get_store(store)
    plan = prepare(st, run, edited_code(run, probes), epochs, None, workers)
    segs = plan["segments"]
    modes = {e: m for s in segs for e, m in s.modes.items()}
    skipped = sorted(e for e, m in modes.items() if m == "skip")
    full = sorted(e for e, m in modes.items() if m != "skip")
    inside = [p.title for p, yes in zip(probes, in_step_loop(run, probes)) if yes]
    if inside:
        why = f"{', '.join(inside)} log{'s' if len(inside) == 1 else ''} inside it"
    elif plan["touched"].get("step"):
        why = "the probes change it"
    else:
        why = "there is no checkpoint at its exit to skip it"
    kept = set(plan["epochs"])
    full_kept = [e for e in full if e in kept]
    full_lead = [e for e in full if e not in kept]
    if skipped and not full:
        step = ("skipped in every epoch: the probes sit outside it, so each epoch restores the state at the "
                "step loop's exit and runs only the code after it")
    else:
        parts = []
        if full_kept:
            parts.append(f"runs in full in epoch{'s' if len(full_kept) > 1 else ''} {format_epochs(full_kept)} ({why})")
        if full_lead:
            parts.append(f"runs in full in epoch{'s' if len(full_lead) > 1 else ''} {format_epochs(full_lead)} "
                         "on the way (no checkpoint at their step loop's exit)")
        if skipped:
            parts.append(f"is skipped in epoch{'s' if len(skipped) > 1 else ''} {format_epochs(skipped)} "
                         "(restored from the state at the step loop's exit)")
        step = "; ".join(parts)
    where = "; ".join(_segment_text(s) for s in segs)
    secs = plan["estimate_seconds"]
    per = run.timings.get("epoch_seconds") or []
    when = ("no recorded epoch timings, so no time estimate" if secs is None else
            f"about {format_seconds(secs)} of training (a recorded epoch took {format_seconds(sum(per) / len(per))}), "
            "plus a few seconds to start the workers and re-run the setup cells")
    n = len(plan["epochs"])
    extra = plan["epochs_to_run"] - n
    text = (f"Replays {n} epoch{'s' if n != 1 else ''} ({format_epochs(plan['epochs'])}) of {run.label} with "
            f"{plan['workers']} worker{'s' if plan['workers'] != 1 else ''}: {where}"
            f"{f' ({extra} earlier epoch(s) re-run to reach them)' if extra > 0 else ''}. "
            f"Step loop: {step}. Expect {when}.")
    order = [e for s in segs for e in sorted(s.modes)]
    return {**plan, "text": text, "step_loop": step, "order": order, "modes": modes}


def _segment_text(seg) -> str:
    span = f"epoch {seg.first}" if seg.first == seg.last else f"epochs {seg.first}-{seg.last}"
    if seg.restore is None:
        return f"{span} from the checkpoint at epoch {seg.first}'s step-loop exit"
    if seg.restore < 0:
        return f"{span} from the checkpoint before the first epoch"
    return f"{span} from the checkpoint after epoch {seg.restore}"


def format_seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.0f} ms" if s < 0.95 else "1 s"
    if s < 90:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    m, sec = divmod(round(s), 60)
    return f"{m} min {sec:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


def last_result(run, store=None):
    """The result frame of ``run``'s latest finished replay, rebuilt from the store; None if none.

    Same shape as :func:`flor_nb.replay`'s result: epoch, step, the probes, the
    recorded metrics, and ``attrs`` with the fidelity and its verdict.
    """
    from .api import dataframe, get_store, replays
    from .replay import verdict_text

    st = get_store(store)
    done = [r for r in replays(run.label, st) if r["status"] == "finished"]
    if not done:
        return None
    last = done[-1]
    probes_ = list(last["probes"])
    metrics = sorted({r["name"] for r in st.logs([run.id], kind="recorded")})
    frame = dataframe(*probes_, *[m for m in metrics if m not in probes_], run=run.label, store=st)
    frame = frame[frame["epoch"].isin(last["epochs"])].drop(columns=["name", "version"])
    frame = frame.dropna(how="all", subset=[c for c in frame.columns if c not in ("epoch", "step", "seq")])
    frame = frame.reset_index(drop=True)
    frame["epoch"] = frame["epoch"].astype(int)
    fidelity = last["fidelity"]
    frame.attrs.update({"run": run.label, "epochs": last["epochs"], "probes": probes_, "fidelity": fidelity,
                        "verdict": verdict_text(fidelity), "code": last["code"], "replay": last["id"]})
    return frame
