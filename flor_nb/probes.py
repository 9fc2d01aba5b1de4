"""Probes: code inserted after a line of a recorded training cell, and where it lands.

A :class:`Probe` says "put this code after line N". This module turns a list of
probes into the edited cell that :func:`flor_nb.replay` runs, says where each
probe really goes (a line inside a multi-line statement moves to its end) and
how often it runs (every step, once per epoch, once), and carries probes over
to a new version of the same run. Checks live in :mod:`flor_nb.probe_check`,
presets in :mod:`flor_nb.presets`; the store remembers each run's probes.
"""
from __future__ import annotations

import ast
import difflib
import re
from dataclasses import asdict, dataclass, field

from .instrument import instrument, parse, recorded_loops
from .store import get_store

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



def logged_names(code: str) -> list[str]:
    """The literal names passed to ``flor.log(...)`` in ``code`` (f-strings show their prefix)."""
    try:
        tree = ast.parse(dedent(code))
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


def dedent(code: str) -> str:
    lines = code.expandtabs(4).splitlines()
    pad = min((len(s) - len(s.lstrip()) for s in lines if s.strip()), default=0)
    return "\n".join(s[pad:] for s in lines)


def indent_of(text: str) -> int:
    text = text.expandtabs(4)
    return len(text) - len(text.lstrip())


def statements(tree: ast.Module):
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


def is_block(stmt) -> bool:
    return any(getattr(stmt, name, None) for name in ("body", "handlers", "cases"))


def header_end(stmt) -> int:
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
    for stmt, ps in statements(tree):
        if is_block(stmt):
            if stmt.lineno <= line <= header_end(stmt):
                body = (stmt.body or stmt.handlers) if hasattr(stmt, "body") else stmt.cases
                after, indent, parents = header_end(stmt), indent_of(lines[body[0].lineno - 1]), ps + [stmt]
        elif stmt.lineno <= line <= (stmt.end_lineno or stmt.lineno):
            after, indent, parents = stmt.end_lineno or stmt.lineno, indent_of(lines[stmt.lineno - 1]), ps
    if indent is None:  # a blank or comment line: take the next statement's indentation
        following = [indent_of(s) for s in lines[line:] if s.strip() and not s.strip().startswith("#")]
        before = [indent_of(s) for s in lines[:line] if s.strip() and not s.strip().startswith("#")]
        indent = following[0] if following else (before[-1] if before else 0)
    nxt = [indent_of(s) for s in lines[after:] if s.strip() and not s.strip().startswith("#")]
    floor = nxt[0] if nxt else 0
    levels = [(_block_label(p, lines), indent_of(lines[body_line(p) - 1])) for p in parents]
    levels = [("top of the cell", 0)] + levels
    valid = [(label, ind) for label, ind in levels if ind == indent or (floor <= ind < indent)]
    if not any(ind == indent for _, ind in valid):
        valid.append(("here", indent))
    return after, indent, sorted(valid, key=lambda x: -x[1])


def body_line(stmt) -> int:
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
        body = [(" " * indent + s) if s.strip() else "" for s in dedent(probe.code).splitlines()] or [" " * indent + "pass"]
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



def in_step_loop(run, probes: list[Probe]) -> list[bool]:
    """Per probe: does it run inside the step loop of the recorded cell?"""
    _, loops = instrument(run.code, what="recorded cell", hint=hint(run))
    if loops.step_line is None:
        return [False] * len(probes)
    tree = parse(run.code)
    step = loop_at(tree, loops.step_line)
    step_indent = indent_of(run.code.splitlines()[body_line(step) - 1])
    out = []
    for probe in probes:
        after, indent, _ = insertion_point(run.code, probe.line)
        indent = indent if probe.indent is None else probe.indent
        out.append(step.lineno <= after <= step.end_lineno and indent >= step_indent)
    return out


def levels(run, line: int) -> tuple[int, list[tuple[str, int]]]:
    """How often code after ``line`` can run, in words: (default indent, [(label, indent)]).

    Labels say "every step", "once per epoch" or "once" and name the loop, instead
    of indentation: ``("every step (inside for xb, yb in loader:)", 8)``.
    """
    _, indent, found = insertion_point(run.code, line)
    try:
        _, loops = instrument(run.code, what="recorded cell", hint=hint(run))
    except Exception:  # noqa: BLE001 - a cell whose loops cannot be found still gets plain labels
        loops = None
    lines = run.code.splitlines()
    marks = {}
    if loops is not None:
        tree = parse(run.code)
        for kind, at in (("every step", loops.step_line), ("once per epoch", loops.epoch_line)):
            if at:
                loop = loop_at(tree, at)
                marks[indent_of(lines[body_line(loop) - 1])] = kind
    out = []
    for label, ind in found:
        head = label.removeprefix("inside ")
        if label == "top of the cell":
            text = "once (top level of the cell)"
        elif ind in marks:
            text = f"{marks[ind]} (inside {head})"
        elif label == "here":
            text = "here"
        else:
            text = f"inside {head}"
        out.append((text, ind))
    return indent, out


def carry(probes: list[Probe], old_code: str, new_code: str) -> tuple[list[Probe], list[Probe]]:
    """Probes of one version of a run moved to another version's cell: (kept, dropped).

    A probe follows the line it was placed after (matched by content); one whose
    line is gone from the new cell is dropped.
    """
    if old_code == new_code:
        return list(probes), []
    old, new = old_code.splitlines(), new_code.splitlines()
    mapping = {0: 0}
    for a, b, size in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_matching_blocks():
        for k in range(size):
            mapping[a + k + 1] = b + k + 1
    kept, dropped = [], []
    for p in probes:
        if p.line in mapping:
            kept.append(Probe(mapping[p.line], p.code, p.preset, dict(p.params), p.indent))
        else:
            dropped.append(p)
    return kept, dropped


def save(run, probes: list[Probe], store=None):
    """Remember ``probes`` for ``run`` in the store."""
    return get_store(store).save_probes(run, [p.to_dict() for p in probes])


def load(run, store=None) -> list[Probe]:
    """The probes remembered for ``run`` (an empty list if none)."""
    return [Probe.from_dict(d) for d in get_store(store).load_probes(run) or []]


def remembered(run, store=None) -> tuple[list[Probe], str]:
    """The run's probes, else those of the nearest other version of the same name, carried over.

    Returns (probes, note): the note says where carried-over probes came from, or "".
    """
    st = get_store(store)
    own = st.load_probes(run)
    if own is not None:
        return [Probe.from_dict(d) for d in own], ""
    others = sorted((r for r in st.all_runs() if r.name == run.name and r.version != run.version),
                    key=lambda r: (abs(r.version - run.version), -r.version))
    for other in others:
        saved = st.load_probes(other)
        if saved:
            kept, dropped = carry([Probe.from_dict(d) for d in saved], other.code, run.code)
            note = f"Probes carried over from {other.label}"
            if dropped:
                note += f"; {len(dropped)} dropped (their line is not in this version: {', '.join(p.title for p in dropped)})"
            return kept, note + "."
    return [], ""


def hint(run) -> dict | None:
    """The loops ``run`` recorded with (see :meth:`flor_nb.instrument.Loops.choice`)."""
    return recorded_loops(getattr(run, "state", None))


def loop_at(tree, line):
    """The for statement of ``tree`` at ``line``."""
    return next(s for s, _ in statements(tree) if s.lineno == line and isinstance(s, (ast.For, ast.AsyncFor)))
