"""The ``%%flor`` / ``%flor`` magics: parse the line, call the engine, show the result."""
from __future__ import annotations

import shlex
import sys

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser
from IPython.display import Image, display

import flor_nb
from flor_nb import plots
from flor_nb.errors import FlorError

USAGE = """\
%%flor record [--name NAME] [--state a,b|+a,+b] [--overhead 0.02] [--store PATH]   record the cell below
%%flor replay RUN [--epochs SPEC] [--workers N] [--store PATH] [--trust]  replay it with the edited cell below
%flor resume RUN [--store PATH] [--trust]                        continue a run a crash or interrupt stopped
%flor runs                                                       list recorded runs
%flor ui [RUN]                                                   open the replay panel
%flor report RUN [--out PATH] [--html]                           write a notebook (and HTML) report
RUN is NAME (latest version) or NAME@VERSION; SPEC is 3, 2-5 or 1,4,7-9 (0-based epochs).
"""


def _parser(prog):
    p = MagicArgumentParser(prog=f"%flor {prog}", add_help=False)
    p.add_argument("--store", default=None, help="store folder (default $FLOR_NB_HOME or ./.flor)")
    return p


_RECORD = _parser("record")
_RECORD.add_argument("--name", default="run")
_RECORD.add_argument("--state", default=None)
_RECORD.add_argument("--overhead", type=float, default=0.02)
_RECORD.add_argument("--no-progress", action="store_true")
_REPLAY = _parser("replay")
_REPLAY.add_argument("run")
_REPLAY.add_argument("--epochs", default=None)
_REPLAY.add_argument("--workers", type=int, default=None)
_REPLAY.add_argument("--no-progress", action="store_true")
_REPLAY.add_argument("--trust", action="store_true", help="re-sign the store first: only for a store you trust")
_RESUME = _parser("resume")
_RESUME.add_argument("run")
_RESUME.add_argument("--no-progress", action="store_true")
_RESUME.add_argument("--trust", action="store_true", help="re-sign the store first: only for a store you trust")
_REPORT = _parser("report")
_REPORT.add_argument("run")
_REPORT.add_argument("--out", default=None)
_REPORT.add_argument("--html", action="store_true")
_UI = _parser("ui")
_UI.add_argument("run", nargs="?", default=None)
_RUNS = _parser("runs")


def _show_run(run, store):
    print(flor_nb.api.summary(run, store))
    missing = flor_nb.api.not_captured(run, store)
    if missing:
        print(f"flor_nb: {missing}", file=sys.stderr)


@magics_class
class FlorMagics(Magics):
    def __init__(self, shell, tracker):
        super().__init__(shell)
        self.tracker = tracker

    @line_cell_magic
    def flor(self, line, cell=None):
        """Hindsight logging: record a training cell, replay it with probes, report.

        %%flor record [--name NAME] [--state a,b|+a,+b] [--overhead FRACTION] [--store PATH]
        %%flor replay RUN [--epochs SPEC] [--workers N] [--store PATH] [--trust]
        %flor resume RUN [--store PATH] [--trust]
        %flor runs | %flor ui [RUN] | %flor report RUN [--out PATH] [--html]
        """
        __tracebackhide__ = True
        if "\0" in line:
            raise UsageError(f"The %flor line holds a NUL character (\\0) at position {line.index(chr(0))}: "
                             f"remove it.\n{USAGE}")
        try:
            words = shlex.split(line)
        except ValueError as e:  # an unbalanced quote
            raise UsageError(f"Cannot read the %flor line {line!r}: {e}. Quote values with matching ' or \" "
                             f"quotes.\n{USAGE}") from None
        if not words:
            raise UsageError(USAGE)
        command, rest = words[0], words[1:]
        handler = getattr(self, f"_{command}", None)
        if handler is None:
            raise UsageError(f"Unknown %flor command {command!r}.\n{USAGE}")
        if command in ("record", "replay") and cell is None:
            raise UsageError(f"%%flor {command} is a cell magic: put it on the first line of the training cell.")
        try:
            return handler(rest, cell)
        except FlorError as e:
            raise UsageError(str(e)) from None

    def _record(self, words, cell):
        __tracebackhide__ = True
        a = _RECORD.parse_args(words)
        history = list(self.tracker.cells)  # post_run_cell has not run for this cell yet
        run = flor_nb.record(
            self.shell.transform_cell(cell), name=a.name, namespace=self.shell.user_ns, history=history,
            state_spec=a.state, store=a.store, progress=not a.no_progress, overhead=a.overhead,
        )
        _show_run(run, a.store)

    def _replay(self, words, cell):
        a = _REPLAY.parse_args(words)
        bar = None
        if not a.no_progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc=f"replay {a.run}", unit="epoch")

        def progress(event):
            if "plan" in event:
                bar.reset(total=event["epochs_to_run"])
            else:
                bar.update(1)

        try:
            df = flor_nb.replay(a.run, code=self.shell.transform_cell(cell), epochs=a.epochs, workers=a.workers,
                                store=a.store, on_event=progress if bar is not None else None,
                                trust_store=a.trust)
        finally:
            if bar is not None:
                bar.close()
        print(f"flor_nb: {df.attrs['fidelity']['plan']} in {df.attrs['fidelity']['seconds']:.1f}s")
        # A verdict that is not plainly faithful is a warning: stderr, where notebooks show it in red.
        level = df.attrs["fidelity"].get("level", "faithful")
        print(df.attrs["verdict"], file=sys.stdout if level == "faithful" else sys.stderr)
        png = plots.probe_png(df)
        if png is not None:
            display(Image(png))
        return df

    def _resume(self, words, cell):
        __tracebackhide__ = True
        a = _RESUME.parse_args(words)
        run = flor_nb.resume(a.run, namespace=self.shell.user_ns, store=a.store, progress=not a.no_progress,
                             trust_store=a.trust)
        note = (run.state.get("resumes") or [{}])[-1]
        how = "objects rebuilt from its recorded cells" if note.get("rebuilt") else "the kernel's live objects"
        print(f"flor_nb: resumed {run.label} at epoch {note.get('from_epoch')} ({how})")
        _show_run(run, a.store)

    def _runs(self, words, cell):
        a = _RUNS.parse_args(words)
        return flor_nb.runs(a.store)

    def _ui(self, words, cell):
        a = _UI.parse_args(words)
        return flor_nb.ui(a.run)

    def _report(self, words, cell):
        a = _REPORT.parse_args(words)
        path = flor_nb.report(a.run, path=a.out, html=a.html, store=a.store)
        print(f"flor_nb: report written to {path}" + (f" and {path.with_suffix('.html')}" if a.html else ""))
        return None
