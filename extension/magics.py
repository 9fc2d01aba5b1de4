"""The ``%%flor`` / ``%flor`` magics: parse the line, call the engine, show the result."""
from __future__ import annotations

import html
import os
import shlex
import sys
from pathlib import Path

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser
from IPython.display import HTML, Image, display

import flor_nb
from flor_nb import plots
from flor_nb.cells import kernel_edits
from flor_nb.errors import FlorError

from .progress import ProgressLine

USAGE = """\
%%flor record [--name NAME] [--state a,b|+a,+b] [--overhead 0.02] [--max-store 2GB] [--store PATH]   record the cell below
%%flor replay RUN [--epochs SPEC | --iters SPEC] [--workers N] [--store PATH] [--trust]  replay it with the edited cell below
                  [--device cpu|cuda:N]      where the recorded tensors go (default: where they were recorded)
                  [--executor dask://HOST:PORT]  where segments run (default: local worker processes)
%flor resume RUN [--store PATH] [--trust]     continue a run a crash or interrupt stopped
%flor runs                                   list recorded runs (size on disk, last metrics, hyperparameters)
%flor ui [RUN] [--executor dask://HOST:PORT] open the replay panel
%flor report RUN [--all-versions] [--out PATH] [--html]   write a notebook (and HTML) report to flor_reports/
%flor rm NAME[@VERSION] ...                  delete runs (NAME: every version) and print what was freed
%flor du                                     show what the store holds on disk
%flor gc                                     remove blobs no checkpoint refers to
RUN is NAME (its latest version) or NAME@VERSION; SPEC is 3, 2-5 or 1,4,7-9 (0-based epochs).
Every command takes --help; every command takes --store PATH (default $FLOR_NB_HOME or ./.flor); a URL
(--store s3://bucket/prefix) puts a recording's checkpoints there and keeps the index in the default store.
"""


def _parser(prog, description):
    # MagicArgumentParser writes its usage as "%" + prog: "%flor runs", "%%flor record"
    p = MagicArgumentParser(prog=f"flor {prog}" if prog not in ("record", "replay") else f"%flor {prog}",
                            description=description, add_help=False)
    p.add_argument("--store", default=None, help="store folder (default $FLOR_NB_HOME or ./.flor)")
    return p


_RECORD = _parser("record", "Record the training cell below: its logs, the cells it depends on, and a checkpoint "
                            "at epoch boundaries, so epochs can be replayed later with new probes.")
_RECORD.add_argument("--name", default="run", help="run name; recording a name again makes a new version")
_RECORD.add_argument("--state", default=None, help="a,b: checkpoint only these names; +a,+b: add them to what "
                                                   "is found automatically")
_RECORD.add_argument("--overhead", type=float, default=0.02, help="checkpoint time budget as a fraction of "
                                                                  "training time (inf: every epoch)")
_RECORD.add_argument("--max-store", default=None, help="disk budget for the run's checkpoints, like 2GB; over it "
                                                       "older ones are thinned (default: a quarter of the free "
                                                       "disk, at most 20GB; inf: no budget)")
_RECORD.add_argument("--no-progress", action="store_true", help="no progress bar")
_REPLAY = _parser("replay", "Replay epochs of a recorded run with the edited cell below (the recorded cell with "
                            "flor.log probes added); returns a DataFrame and checks the replay is faithful.")
_REPLAY.add_argument("run", help="NAME (latest version) or NAME@VERSION")
_REPLAY.add_argument("--epochs", default=None, help="3, 2-5 or 1,4,7-9 (0-based; default: every epoch)")
_REPLAY.add_argument("--iters", default=None, help="the same, for a loop that counts iterations: 5000-5200")
_REPLAY.add_argument("--cell", type=int, default=None,
                     help="use the functions and classes of In[N] of this kernel in place of the recorded ones")
_REPLAY.add_argument("--show-setup", action="store_true",
                     help="show what the recorded cells printed while the replay rebuilt them (kept quiet otherwise)")
_REPLAY.add_argument("--recorded-cells", action="store_true",
                     help="ignore helpers edited in this kernel since the recording; replay the recorded cells")
_REPLAY.add_argument("--workers", type=int, default=None, help="worker processes (default: as the cores allow)")
_REPLAY.add_argument("--device", default=None,
                     help="where the recorded tensors go: cpu, cuda, cuda:N (default: where they were recorded); "
                          "across devices values are compared with a tolerance and the verdict says so")
_REPLAY.add_argument("--executor", default=None, help="where segments run: local (default; or $FLOR_NB_EXECUTOR), "
                                                    "or a Dask scheduler: dask://host:8786")
_REPLAY.add_argument("--no-progress", action="store_true", help="no progress bar")
_REPLAY.add_argument("--trust", action="store_true", help="re-sign the store first: only for a store you trust")
_RESUME = _parser("resume", "Continue a run that a crash, SIGKILL or interrupt stopped, from its last checkpoint.")
_RESUME.add_argument("run", help="NAME (latest version) or NAME@VERSION")
_RESUME.add_argument("--no-progress", action="store_true", help="no progress bar")
_RESUME.add_argument("--trust", action="store_true", help="re-sign the store first: only for a store you trust")
_REPORT = _parser("report", "Write a standalone notebook report of a run (code, probes as diffs, metrics, plots, "
                            "checkpoints) to flor_reports/ beside this notebook, and link it.")
_REPORT.add_argument("run", help="NAME (latest version) or NAME@VERSION")
_REPORT.add_argument("--all-versions", action="store_true", help="compare every version of the run's name")
_REPORT.add_argument("--out", default=None, help="a folder or .ipynb path (default flor_reports/)")
_REPORT.add_argument("--html", action="store_true", help="also write a self-contained .html")
_UI = _parser("ui", "Open the replay panel: pick a run, add probes, pick epochs on the curve, replay, compare.")
_UI.add_argument("run", nargs="?", default=None, help="NAME or NAME@VERSION (default: the latest run)")
_UI.add_argument("--executor", default=None, help="where the panel's replays run: local (default; or "
                                                  "$FLOR_NB_EXECUTOR), or a Dask scheduler: dask://host:8786")
_RUNS = _parser("runs", "List recorded runs: status, epochs, size on disk, hyperparameters, last metrics.")
_RM = _parser("rm", "Delete runs with their checkpoints, logs, replays and probes, then the blobs nothing else "
                    "refers to. Asks nothing; prints what was freed. Refuses a run that is being recorded.")
_RM.add_argument("runs", nargs="+", help="NAME@VERSION for one version, NAME for every version of NAME")
_DU = _parser("du", "Show what the store holds on disk: each run's size and what deleting it frees.")
_GC = _parser("gc", "Remove blobs no checkpoint refers to and files left by deleted runs.")
_PARSERS = {"record": _RECORD, "replay": _REPLAY, "resume": _RESUME, "report": _REPORT, "ui": _UI, "runs": _RUNS,
            "rm": _RM, "du": _DU, "gc": _GC}


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

        %%flor record [--name NAME] [--state a,b|+a,+b] [--overhead FRACTION] [--max-store SIZE] [--store PATH]
        %%flor replay RUN [--epochs SPEC] [--workers N] [--executor dask://HOST:PORT] [--store PATH] [--trust]
        %flor resume RUN [--store PATH] [--trust]
        %flor runs | %flor ui [RUN] [--executor dask://HOST:PORT]
        %flor report RUN [--all-versions] [--out PATH] [--html]
        %flor rm NAME[@VERSION] ... | %flor du | %flor gc
        Each command takes --help.
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
        if command in ("-h", "--help", "help"):
            print(USAGE)
            return None
        handler = getattr(self, f"_{command}", None) if command in _PARSERS else None
        if handler is None:
            raise UsageError(f"Unknown %flor command {command!r}.\n{USAGE}")
        if "-h" in rest or "--help" in rest:
            print(_PARSERS[command].format_help())  # the cell below, if any, does not run
            return None
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
            state_spec=a.state, store=a.store, progress=not a.no_progress and ProgressLine, overhead=a.overhead,
            max_store=a.max_store,
        )
        _show_run(run, a.store)

    def _replay(self, words, cell):
        a = _REPLAY.parse_args(words)
        bars = []

        done: dict = {}  # segment -> units it has run

        def progress(event):
            # the bar appears once the replay is planned: a bad run name or epoch spec leaves no empty bar
            if "plan" in event:
                from tqdm.auto import tqdm

                unit = "iter" if event.get("unit") == "iterations" else "epoch"
                bars.append(tqdm(desc=f"replay {a.run}", unit=unit, total=event["epochs_to_run"]))
            elif "epoch" in event and bars:
                done[event.get("segment")] = event.get("done", done.get(event.get("segment"), 0) + 1)
                bars[0].update(sum(done.values()) - bars[0].n)

        edits = {}
        if not a.recorded_cells:  # a helper edited (a probe in train()) and run again: replay uses it, and says so
            run = flor_nb.get_run(a.run, store=a.store)
            edits, notes = kernel_edits(run.deps, list(self.tracker.cells), a.cell)
            for note in notes:
                print(f"flor_nb: replaying with {note}; --recorded-cells to replay the recorded ones")
        try:
            df = flor_nb.replay(a.run, code=self.shell.transform_cell(cell), epochs=a.epochs, iters=a.iters,
                                workers=a.workers, cells=edits or None, device=a.device, executor=a.executor,
                                store=a.store, on_event=None if a.no_progress else progress,
                                trust_store=a.trust)
        finally:
            for bar in bars:
                bar.close()
        if a.show_setup and df.attrs["fidelity"].get("setup_output"):
            print("flor_nb: the recorded cells printed, while the replay rebuilt them:\n"
                  + df.attrs["fidelity"]["setup_output"].rstrip())
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
        run = flor_nb.resume(a.run, namespace=self.shell.user_ns, store=a.store,
                             progress=not a.no_progress and ProgressLine,
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
        return flor_nb.ui(a.run, store=a.store, executor=a.executor)

    def _report(self, words, cell):
        a = _REPORT.parse_args(words)
        path = flor_nb.report(a.run, path=a.out, html=a.html, store=a.store, all_versions=a.all_versions)
        rel = _relative(path)
        html_path = rel[:-len(".ipynb")] + ".html"
        print(f"flor_nb: report written to {rel}" + (f" and {html_path}" if a.html else ""))
        links = f'<a href="{_esc(rel)}" target="_blank">{_esc(rel)}</a>'
        if a.html:
            links += f' \u00b7 <a href="{_esc(html_path)}" target="_blank">{_esc(html_path)}</a>'
        display(HTML(f"Open the report: {links}"))
        return None

    def _rm(self, words, cell):
        a = _RM.parse_args(words)
        print(flor_nb.delete(*a.runs, store=a.store))

    def _du(self, words, cell):
        a = _DU.parse_args(words)
        return flor_nb.du(a.store).drop(columns=["bytes"])

    def _gc(self, words, cell):
        a = _GC.parse_args(words)
        print(flor_nb.gc(a.store))


def _relative(path) -> str:
    """``path`` relative to the working directory (the notebook's folder): a link Jupyter opens."""
    try:
        return Path(os.path.relpath(path, Path.cwd())).as_posix()
    except ValueError:
        return str(path)


def _esc(text) -> str:
    return html.escape(str(text), quote=True)
