"""Checking probes before a replay runs: syntax, undefined names, loops a probe would move.

Nothing runs. Each :class:`Problem` names the recorded line the probe follows
and what to do, so the panel can mark it at that line.
"""
from __future__ import annotations

import ast
import builtins
from dataclasses import dataclass

from .cells import analyze
from .errors import FlorError, ProbeSyntaxError
from .instrument import instrument, parse
from .probes import Probe, apply, dedent, hint


@dataclass
class Problem:
    """Something wrong with a probe, found before replay: where, and what to do."""

    probe: int  # index into the probe list; -1 for the edited cell as a whole
    line: int  # line of the recorded cell the probe follows
    kind: str  # "syntax", "name" or "loop"
    message: str

    def __str__(self):
        return f"Probe at line {self.line}: {self.message}"


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
            tree = parse(dedent(probe.code), "probe")
        except ProbeSyntaxError as e:
            problems.append(Problem(i, probe.line, "syntax", _first_line(str(e)) + f" (probe line {e.lineno})"))
            continue
        good.append(i)
        if any(isinstance(n, (ast.For, ast.AsyncFor, ast.While)) for n in tree.body):
            problems.append(Problem(i, probe.line, "loop", (
                "a for/while statement in a probe can be taken for the epoch or step loop; "
                "use a comprehension, e.g. [flor.log(f'w/{n}', p.norm()) for n, p in model.named_parameters()]")))
        free, _ = analyze(dedent(probe.code))
        missing = sorted(free - names) if complete else []
        if missing:
            problems.append(Problem(i, probe.line, "name", (
                f"name{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                f"{'are' if len(missing) > 1 else 'is'} not defined in the recorded cell or the cells it depends on")))
    if problems:
        return problems
    edited, spans = apply(run.code, probes)
    try:
        _, loops = instrument(edited, what="edited cell", hint=hint(run))
    except ProbeSyntaxError as e:
        # the probe holding the bad line, or the one just before it (a dedent breaks the next line)
        owner = next((i for i, s in enumerate(spans) if s and s[0] <= (e.lineno or 0) <= s[1] + 1), None)
        line = probes[owner].line if owner is not None else _recorded_line(spans, probes, e.lineno or 0)
        problems.append(Problem(owner if owner is not None else -1, line, "syntax",
                                _first_line(str(e)).replace("edited cell", "cell with the probe") +
                                " (check the probe's indentation)"))
        return problems
    _, was = instrument(run.code, what="recorded cell", hint=hint(run))
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


