"""The replay panel: pick a run, add probes at lines of its cell, pick epochs, replay, read results.

Every action is a call to the engine (``flor_nb.start_replay``, ``flor_nb.api``,
``flor_nb.probes``, ``flor_nb.delete``, ``flor_nb.report``); the panel only
arranges widgets around them. Results are ordinary outputs (HTML table, PNG
figures) inside ``Output`` widgets, and the panel also keeps a static HTML copy
of itself as a plain output, so results stay readable when widget state is lost.
"""
from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path

import ipywidgets as W
from IPython import get_ipython
from IPython.display import HTML, display

import flor_nb
from flor_nb import api
from flor_nb import probe_check as C
from flor_nb import probes as P
from flor_nb.background import CANCELLED, FAILED, ReplayHandle, start_replay
from flor_nb.errors import FlorError
from flor_nb.executor import ENV
from flor_nb.plan import format_epochs, format_seconds, parse_epochs

from . import plots, results, static
from .common import Callbacks, guarded, layout
from .curve import EpochCurve
from .editor import ProbeEditor
from .runs import RunPicker
from .style import CSS, badge, esc, section

STATUS = {"ok": "\u25cf", "busy": "\u25cf", "warn": "\u25b2", "bad": "\u2716"}


_MAX_CHIPS = 40  # more units than this (iterations) are summed up on one line


class Panel(W.VBox, Callbacks):
    """The replay panel over one store.

    ``panel.result`` is the last result DataFrame; ``panel.replay()`` and
    ``panel.wait()`` do what the Replay button does, for scripts and tests.
    """

    def __init__(self, run=None, store=None, executor=None):
        super().__init__(layout=layout(width="100%"))
        self.add_class("flor-panel")
        self.store = flor_nb.get_store(store)
        self.run = None
        self.job: ReplayHandle | None = None
        self._recorded = None
        self._lock = threading.Lock()
        self._chip_order: list[int] = []
        self._chip_modes: dict = {}
        self._chip_wanted: set = set()  # the epochs asked for; the others are re-run on the way to them
        self._static = None  # the display handle of the static copy, once displayed
        self._status_text = ""

        self.status = W.HTML()
        self.error_out = W.Output(layout=layout(width="100%"))
        self.picker = RunPicker(self.store, on_select=self._on_run, on_fail=self._fail, on_status=self._set_status)
        self.editor = ProbeEditor(self.store, on_change=self._on_probes, on_status=self._set_status,
                                  on_fail=self._fail)
        self.metric = W.Dropdown(description="curve", layout=layout(width="260px"))
        self.metric.observe(self._on_metric, "value")
        self.curve = EpochCurve(layout=layout(width="100%", max_width="740px"))
        self.curve.observe(self._on_curve, "selected")
        self.epoch_text = W.Text(description="epochs", placeholder="1,4,7-9", continuous_update=False,
                                 layout=layout(width="260px"))
        self.epoch_text.add_class("flor-epochs")
        self.epoch_text.observe(self._on_epoch_text, "value")
        cpus = os.cpu_count() or 1
        self.workers = W.Dropdown(description="workers", value=0, layout=layout(width="180px"),
                                  options=[("auto", 0)] + [(str(i), i) for i in range(1, cpus + 1)])
        self.workers.observe(self._on_workers, "value")
        # Where replays run: blank is flor.replay's default ($FLOR_NB_EXECUTOR, else this machine's workers).
        self._given_executor = executor  # a Dask client (or any executor) passed in; shown by its address
        default = os.environ.get(ENV) or "local"
        self.executor = W.Text(description="executor", value=_executor_text(executor), continuous_update=False,
                               placeholder=f"{default} (or dask://host:8786)", layout=layout(width="300px"))
        self.executor.observe(self._on_workers, "value")
        self.estimate = W.HTML()
        self.replay_button = W.Button(description="Replay", icon="play", button_style="success")
        self.replay_button.on_click(self._on_replay)
        self.cancel_button = W.Button(description="Cancel", icon="stop", button_style="danger", disabled=True)
        self.cancel_button.on_click(self._on_cancel)
        self.progress = W.IntProgress(min=0, max=1, value=0, layout=layout(width="240px"))
        self.clock = W.HTML()
        self.outcome = W.HTML()  # the verdict or the failure, right next to the Replay button
        self.outcome.add_class("flor-outcome")
        self.replay_msg = W.Output(layout=layout(width="100%"))  # a replay's error, right under the button
        self.replay_msg.add_class("flor-replay-msg")
        self.chips = W.HTML()
        self.results = results.ResultsView(on_fail=self._fail)
        self.report_button = W.Button(description="Write report", icon="file", tooltip=(
            "A notebook (and HTML) report of this run in flor_reports/, beside this notebook"))
        self.report_button.on_click(self._on_report)
        self.report_link = W.HTML()

        self.title = W.HTML(CSS + '<span class="flor-title">flor_nb replay</span>')
        self.children = [
            W.HBox([self.title, self.status], layout=layout(justify_content="space-between", align_items="center",
                                                            flex_flow="row wrap")),
            self.error_out,
            W.HTML(section("1", "Run", "select one to replay; select two to compare their curves")),
            self.picker,
            W.HTML(section("2", "Code and probes", "click a line of the recorded cell, then add a probe after it")),
            self.editor,
            W.HTML(section("3", "Epochs", "click or drag on the curve, or type them")),
            self.curve,
            W.HBox([self.metric, self.epoch_text, self.workers, self.executor], layout=layout(flex_flow="row wrap")),
            W.HTML(section("4", "Replay")),
            self.estimate,
            W.HBox([self.replay_button, self.cancel_button, self.outcome, self.progress, self.clock],
                   layout=layout(align_items="center", flex_flow="row wrap")),
            self.replay_msg,
            self.chips,
            self.results,
            W.HBox([self.report_button, self.report_link], layout=layout(align_items="center")),
        ]
        self._set_status("ok", "Ready")
        self.picker.refresh(select=run)
        self._watch_cells()

    @property
    def probes(self) -> list[P.Probe]:
        return self.editor.probes

    @property
    def result(self):
        return self.results.frame

    # -- display: the live widget and its static copy -----------------------------
    def _ipython_display_(self, **kwargs):
        self.title.value = CSS + static.hide_rule(self.model_id) + '<span class="flor-title">flor_nb replay</span>'
        display(self._repr_mimebundle_(**kwargs), raw=True)
        self._static = display(HTML(self.snapshot_html()), display_id=True)

    def snapshot_html(self) -> str:
        """The panel as static HTML (see :mod:`flor_nb.widgets.static`)."""
        frame = self.results.frame
        note = "Cancelled: the results of the epochs that finished." if frame is not None and frame.attrs.get(
            "cancelled") else ""
        return static.snapshot_html(self.model_id or "", self.run.label if self.run else None, self._status_text,
                                    frame, note)

    def _update_static(self):
        if self._static is not None:
            try:
                self._static.update(HTML(self.snapshot_html()))
            except Exception:  # noqa: BLE001 - the live panel matters more than its copy
                pass

    def _watch_cells(self):
        """New runs show up by themselves: after every cell the kernel runs, look at the store again."""
        ip = get_ipython()
        if ip is None:
            return
        me = weakref.ref(self)

        def after_cell(_result=None):
            panel = me()
            if panel is None or panel.comm is None:  # closed: stop watching
                try:
                    ip.events.unregister("post_run_cell", after_cell)
                except ValueError:
                    pass
                return
            if panel.job is None or not panel.job.running:
                panel.picker.refresh_if_changed()

        ip.events.register("post_run_cell", after_cell)

    # -- status and errors ---------------------------------------------------
    def _set_status(self, kind: str, text: str):
        self._status_text = text
        self.status.value = (f'<span class="flor-status {kind}"><span class="dot">{STATUS[kind]}</span>'
                             f"{esc(text)}</span>")

    def _fail(self, exc: BaseException, context: str = ""):
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        self._set_status("bad", first[:140])
        self.error_out.outputs = ()
        self.error_out.append_display_data(HTML(results.error_html(exc, context)))

    def _fail_replay(self, exc: BaseException, context: str):
        """A replay's error goes next to the Replay button, where the user is looking."""
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        self._set_status("bad", first[:140])
        self.replay_msg.outputs = ()
        self.replay_msg.append_display_data(HTML(results.error_html(exc, context)))

    # -- run -----------------------------------------------------------------
    def _on_run(self, label: str | None):
        self.error_out.outputs = ()
        if label is None:
            self.run = None
            self.replay_button.disabled = True
            n = len(self.picker.labels)
            if n:
                self._set_status("warn", f"No run selected: select one above to replay it ({n} recorded)")
            else:
                self._set_status("ok", f"No recorded runs in {self.store.home} yet: record one with "
                                       "%%flor record --name NAME")
            return
        self.select_run(label)

    def select_run(self, label):
        """Fill the panel from run ``label`` (``NAME`` or ``NAME@VERSION``)."""
        run = self.run = self.store.find_run(label)
        self._recorded = api.recorded(run, self.store)
        self.replay_msg.outputs = ()
        self.outcome.value = self.report_link.value = ""
        with self.quiet():
            self._fill_epochs()
        self._set_status("ok", f"{run.label}: {run.status}, {run.epochs_completed} epochs")
        self.editor.set_run(run)  # also updates the estimate, through _on_probes
        self._show_last_result()
        missing = sorted(run.state.get("not_captured") or {})
        if missing:  # replays restore everything else: say what they cannot, before anyone replays
            self._set_status("warn", f"{run.label}: {run.status}, {run.epochs_completed} epochs; not captured: "
                                     f"{', '.join(missing)}")
        self._update_static()

    def _on_probes(self):
        running = self.job is not None and self.job.running
        self.replay_button.disabled = bool(self.editor.problems) or running or self.run is None
        self._update_estimate()

    # -- epochs --------------------------------------------------------------
    def _fill_epochs(self):
        n, rec = self.run.epochs_completed, self._recorded
        metrics = [m for m in dict.fromkeys(rec["name"]) if not plots.per_epoch(rec, m).empty]
        self.metric.options = metrics or [("(none)", "")]
        epoch_level = [m for m in metrics if rec[rec["name"] == m]["step"].isna().any()]
        self.metric.value = (epoch_level or metrics or [""])[0]
        self.epoch_text.value = format_epochs(range(n))
        self._draw_curve()

    def selected_epochs(self) -> list[int]:
        return parse_epochs(self._epoch_spec(), self.run.epochs_completed, self.run.label)

    def _epoch_spec(self) -> str | None:
        return self.epoch_text.value.strip() or None

    def _draw_curve(self):
        try:
            selected = self.selected_epochs()
        except FlorError:
            selected = []
        metric = self.metric.value or None
        kind = ""
        if metric is not None:
            rows = self._recorded[self._recorded["name"] == metric]
            kind = "" if rows["step"].isna().any() else " (mean per epoch)"
        with self.quiet():
            self.curve.n_epochs = self.run.epochs_completed
            self.curve.points = plots.curve_points(self._recorded, metric, self.run.epochs_completed)
            self.curve.label = f"{metric or ''}{kind}"
            self.curve.selected = selected

    @guarded
    def _on_curve(self, change):
        """Pick epochs on the curve."""
        picked = sorted(set(change["new"]))
        with self.quiet():
            self.epoch_text.value = format_epochs(picked)
        self._update_estimate()

    @guarded
    def _on_epoch_text(self, change):
        """Read the epoch list."""
        self._draw_curve()
        self._update_estimate()

    @guarded
    def _on_metric(self, change):
        """Draw the metric curve."""
        self._draw_curve()

    @guarded
    def _on_workers(self, change):
        """Choose the workers, or where they are."""
        self._update_estimate()

    # -- estimate and replay -------------------------------------------------
    def _executor(self):
        """What the executor box names: the executor passed in while its address is shown, else the text."""
        text = self.executor.value.strip()
        if not text:
            return None
        if self._given_executor is not None and text == _executor_text(self._given_executor):
            return self._given_executor
        return text

    def _plan(self) -> dict:
        return api.estimate(self.run, self.probes, self._epoch_spec(), self.workers.value or None, self.store,
                            executor=self._executor())

    def _update_estimate(self):
        if self.run is None:
            return
        try:
            text = self._plan()["text"]
        except C.ProbeError:
            text, bad = "Fix the probe problems marked above before replaying.", True
        except FlorError as e:
            text, bad = str(e), True
        else:
            bad = False
        self.estimate.value = f'<div class="flor-estimate{" flor-problem" if bad else ""}">{esc(text)}</div>'

    @guarded
    def _on_replay(self, _button=None):
        """Start the replay."""
        try:
            self.replay()
        except Exception as e:  # noqa: BLE001 - shown next to the button
            self.outcome.value = badge("bad", "\u2716 not started")
            self._fail_replay(e, "The replay could not start:")

    def replay(self) -> ReplayHandle:
        """Start replaying the selected epochs with the probes in a background thread; returns its handle."""
        if self.run is None:
            raise FlorError("Select a run first: click one in the runs table above.")
        if self.job is not None and self.job.running:
            raise FlorError("A replay is already running: wait for it or press Cancel.")
        self.error_out.outputs = ()
        self.replay_msg.outputs = ()
        self.outcome.value = self.report_link.value = ""
        code = C.edited_code(self.run, self.probes)
        plan = self._plan()
        self._chip_order, self._chip_modes, self._chip_wanted = plan["order"], plan["modes"], set(plan["epochs"])
        self.progress.max = max(len(plan["order"]), 1)
        self.progress.value = 0
        self.progress.bar_style = "info"
        self.results.clear()
        self.replay_button.disabled = True
        self.cancel_button.disabled = False
        self._set_status("busy", f"Replaying epochs {format_epochs(plan['epochs'])} of {self.run.label}\u2026")
        self.job = start_replay(self.run.label, code, self._epoch_spec(), workers=plan["workers"], store=self.store,
                                plan=plan, on_change=self._on_progress, on_done=self._on_done,
                                executor=self._executor())
        self._render_progress(self.job)
        return self.job

    def wait(self, timeout: float | None = 120) -> bool:
        """Block until the running replay ends (scripts and tests); True if it ended."""
        return self.job is None or self.job.wait(timeout)

    @guarded
    def _on_cancel(self, _button=None):
        """Cancel the replay."""
        if self.job is not None and self.job.running:
            self._set_status("busy", "Cancelling: stopping the workers\u2026")
            self.job.cancel()

    def _on_progress(self, job: ReplayHandle):
        with self._lock:
            if job is self.job and job.running:
                self.progress.value = min(job.units_done, self.progress.max)
                self._render_progress(job)

    def _render_progress(self, job: ReplayHandle):
        left = job.remaining
        if not job.running and job.ended is not None:
            word = {FAILED: "failed after", CANCELLED: "cancelled after"}.get(job.state, "finished in")
            text = f"{word} {format_seconds(job.elapsed)}"
        elif not job.ran:
            text = f"{format_seconds(job.elapsed)} elapsed \u00b7 starting workers, re-running setup cells\u2026"
        else:
            text = f"{format_seconds(job.elapsed)} elapsed" + (
                f" \u00b7 about {format_seconds(left)} left" if left is not None else "")
        self.clock.value = f'<span class="flor-muted">{esc(text)}</span>'
        if len(self._chip_order) > _MAX_CHIPS:  # an iteration loop: thousands of units, one line for them all
            kept = sorted(k for k in job.kept if k in self._chip_wanted)
            wanted = format_epochs(sorted(self._chip_wanted))
            self.chips.value = (f'<div class="flor-chips"><span class="{"done" if kept else ""}">'
                                f"{job.units_done:,} of {len(self._chip_order):,} passes run; asked for {esc(wanted)}"
                                f"{'; kept ' + esc(format_epochs(kept)) if kept else ''}</span></div>")
            return
        chips = []
        for k in self._chip_order:
            skip = " \u00b7 steps skipped" if self._chip_modes.get(k) == "skip" else ""
            took = format_seconds(job.ran[k]) if k in job.ran else ""
            if k not in self._chip_wanted:
                state = f"ran on the way {took}" if k in job.ran else "on the way"
                chips.append(f'<span title="re-run only to reach the epochs asked for">epoch {k} {state}</span>')
            elif k in job.kept:
                chips.append(f'<span class="done" title="values kept">epoch {k} \u2714 {took}{skip}</span>')
            elif job.state == FAILED and k == job.failed_epoch:
                chips.append(f'<span class="failed">epoch {k} \u2716 failed</span>')
            elif not job.running and k in job.ran:
                chips.append(f'<span class="lost" title="its segment did not finish, so its values were not kept">'
                             f"epoch {k} ran, not kept</span>")
            elif not job.running:
                chips.append(f'<span class="lost">epoch {k} {"did not run" if job.state == FAILED else "cancelled"}'
                             "</span>")
            elif k in job.ran:
                chips.append(f'<span class="ran" title="done; kept when the rest of its segment finishes">epoch {k} '
                             f"ran {took}{skip}</span>")
            else:
                chips.append(f"<span>epoch {k}{skip}</span>")
        self.chips.value = f'<div class="flor-chips">{"".join(chips)}</div>'

    def _on_done(self, job: ReplayHandle):
        with self._lock:
            self.cancel_button.disabled = True
            self.replay_button.disabled = bool(self.editor.problems) or self.run is None
            self.progress.value = len(job.kept) if job.state != "finished" else self.progress.max
            self._render_progress(job)
            if job.state == "finished":
                self.progress.bar_style = "success"
                self._show_result(job.result)
            elif job.state == CANCELLED:
                self.progress.bar_style = "warning"
                self._show_cancelled(job)
            else:
                self.progress.bar_style = "danger"
                where = f" in epoch {job.failed_epoch}" if job.failed_epoch is not None else ""
                self.outcome.value = badge("bad", f"\u2716 failed{where}")
                self._fail_replay(job.error, "The replay failed:")
            self._update_static()

    def _show_result(self, frame, note=""):
        frame.attrs.setdefault("code", self.job.code if self.job else "")
        try:
            self.results.show(frame, note=note)
        except Exception as e:  # noqa: BLE001 - shown in the panel
            self._fail_replay(e, "Showing the results failed:")
            return
        kind = results.verdict_level(frame.attrs)
        fid = frame.attrs["fidelity"]
        if frame.attrs.get("cancelled"):
            kept = (fid.get("cancelled") or {}).get("kept") or []
            word = (f"partial: epoch{'s' if len(kept) > 1 else ''} {format_epochs(kept)} kept" if kept
                    else "cancelled: nothing kept")
        else:
            word = {"ok": "faithful", "warn": "faithful, with caveats", "bad": "NOT faithful"}[kind]
        icon = {"ok": "\u2714", "warn": "\u26a0", "bad": "\u2716"}[kind]
        self.outcome.value = badge(kind, f"{icon} {word}")
        self._set_status({"ok": "ok", "warn": "warn", "bad": "bad"}[kind],
                         f"Replayed {self.run.label} in {format_seconds(self.job.elapsed)}: {word}")

    def _show_cancelled(self, job: ReplayHandle):
        partial = job.result  # the engine keeps the epochs whose segment finished
        if partial is not None and not partial.empty:
            self._show_result(partial, note="Cancelled: the results of the epochs that finished.")
        else:
            self.outcome.value = badge("warn", "\u25a0 cancelled: nothing kept")
            ran = format_epochs(sorted(job.ran))
            why = (f"Epoch{'s' if len(job.ran) > 1 else ''} {ran} ran, but {'their' if len(job.ran) > 1 else 'its'} "
                   "segment was stopped before it finished, so no values were kept. " if job.ran else "")
            self.results.clear(f'<div class="flor-verdict warn">\u25a0 Cancelled after '
                               f"{esc(format_seconds(job.elapsed))}: nothing was compared and no values were stored. "
                               f"{esc(why)}Earlier results are unchanged in the store. Replay fewer epochs to get "
                               "results sooner.</div>")
        self._set_status("warn", f"Cancelled after {format_seconds(job.elapsed)}; "
                                 f"{len(job.kept)} of {len(self._chip_order)} epochs kept")

    def _show_last_result(self):
        self.results.clear()
        self.chips.value = self.clock.value = ""
        self.progress.value = 0
        frame = api.last_result(self.run, self.store)
        if frame is not None:
            what = "cancelled replay (partial)" if frame.attrs.get("cancelled") else "replay"
            self.results.show(frame, note=f"Last {what} of {self.run.label} (#{frame.attrs['replay']}), "
                                          "from the store.")

    # -- report --------------------------------------------------------------
    @guarded
    def _on_report(self, _button=None):
        """Write the report."""
        if self.run is None:
            raise FlorError("Select a run first.")
        path = flor_nb.report(self.run.label, html=True, store=self.store)
        self.report_link.value = report_links(path)


def report_links(path: Path) -> str:
    """Links to a report, relative to the working directory (the notebook's folder) so Jupyter opens them."""
    try:
        rel = Path(os.path.relpath(path, Path.cwd())).as_posix()
    except ValueError:
        rel = str(path)
    html_rel = rel[:-len(".ipynb")] + ".html" if rel.endswith(".ipynb") else rel
    links = f'<a href="{esc(rel)}" target="_blank" class="flor-report-link">{esc(rel)}</a>'
    if Path(path).with_suffix(".html").exists():
        links += f' \u00b7 <a href="{esc(html_rel)}" target="_blank">HTML</a>'
    return f'<span class="flor-muted">Report: </span>{links}'


def _executor_text(executor) -> str:
    """How the executor box shows ``executor``: a Dask client as ``dask://host:port``."""
    if executor is None:
        return ""
    if isinstance(executor, str):
        return executor
    address = getattr(getattr(executor, "scheduler", None), "address", None)
    if isinstance(address, str):
        return address.replace("tcp://", "dask://", 1)
    return type(executor).__name__
