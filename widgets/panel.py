"""The replay panel: pick a run, add probes at lines of its cell, pick epochs, replay, read results.

Every action is a call to the engine's public API (``flor_nb.replay``,
``flor_nb.probes``, ``flor_nb.runs``); the panel only arranges widgets around
them. Results are ordinary outputs (HTML table, PNG figures) inside ``Output``
widgets, so they are saved with the widget state and survive reopening.
"""
from __future__ import annotations

import os
import threading

import ipywidgets as W
from IPython.display import HTML

import flor_nb
from flor_nb import probes as P
from flor_nb.errors import FlorError
from flor_nb.executor import ReplayCancelled
from flor_nb.plan import parse_epochs

from . import plots, results
from .common import Callbacks, guarded, layout
from .editor import ProbeEditor
from .job import ReplayJob
from .runs import RunPicker
from .style import CSS, esc, section

STATUS = {"ok": "\u25cf", "busy": "\u25cf", "bad": "\u2716"}


class Panel(W.VBox, Callbacks):
    """The replay panel over one store.

    ``panel.result`` is the last result DataFrame; ``panel.replay()`` and
    ``panel.wait()`` do what the Replay button does, for scripts and tests.
    """

    def __init__(self, run=None, store=None):
        super().__init__(layout=layout(width="100%"))
        self.add_class("flor-panel")
        self.store = flor_nb.get_store(store)
        self.run = None
        self.job: ReplayJob | None = None
        self._recorded = None
        self._lock = threading.Lock()
        self._chip_order: list[int] = []
        self._chip_modes: dict = {}

        self.status = W.HTML()
        self.error_out = W.Output(layout=layout(width="100%"))
        self.picker = RunPicker(self.store, on_select=self._on_run, on_fail=self._fail)
        self.editor = ProbeEditor(self.store, on_change=self._on_probes, on_status=self._set_status,
                                  on_fail=self._fail)
        self.metric = W.Dropdown(description="curve", layout=layout(width="260px"))
        self.metric.observe(self._on_metric, "value")
        self.curve = W.Image(format="png", layout=layout(max_width="720px"))
        self.epoch_slider = W.IntRangeSlider(description="epochs", min=0, max=1, value=(0, 1),
                                             continuous_update=False, layout=layout(width="480px"))
        self.epoch_slider.observe(self._on_slider, "value")
        self.epoch_text = W.Text(description="or list", placeholder="1,4,7-9", continuous_update=False,
                                 layout=layout(width="260px"))
        self.epoch_text.add_class("flor-epochs")
        self.epoch_text.observe(self._on_epoch_text, "value")
        cpus = os.cpu_count() or 1
        self.workers = W.Dropdown(description="workers", value=0, layout=layout(width="180px"),
                                  options=[("auto", 0)] + [(str(i), i) for i in range(1, cpus + 1)])
        self.workers.observe(self._on_workers, "value")
        self.estimate = W.HTML()
        self.replay_button = W.Button(description="Replay", icon="play", button_style="success")
        self.replay_button.on_click(self._on_replay)
        self.cancel_button = W.Button(description="Cancel", icon="stop", button_style="danger", disabled=True)
        self.cancel_button.on_click(self._on_cancel)
        self.progress = W.IntProgress(min=0, max=1, value=0, layout=layout(width="320px"))
        self.clock = W.HTML()
        self.chips = W.HTML()
        self.results = results.ResultsView(on_fail=self._fail)

        title = W.HTML(CSS + '<span class="flor-title">flor_nb replay</span>')
        self.children = [
            W.HBox([title, self.status], layout=layout(justify_content="space-between", align_items="center")),
            self.error_out,
            W.HTML(section("1", "Run", "select one to replay; select two to compare their curves")),
            self.picker,
            W.HTML(section("2", "Code and probes", "click a line of the recorded cell, then add a probe after it")),
            self.editor,
            W.HTML(section("3", "Epochs", "pick the epochs where something looked wrong")),
            W.HBox([self.epoch_slider, self.epoch_text, self.workers], layout=layout(flex_flow="row wrap")),
            self.metric, self.curve,
            W.HTML(section("4", "Replay")),
            self.estimate,
            W.HBox([self.replay_button, self.cancel_button, self.progress, self.clock],
                   layout=layout(align_items="center", flex_flow="row wrap")),
            self.chips,
            self.results,
        ]
        self._set_status("ok", "Ready")
        self.picker.refresh(select=run)

    @property
    def probes(self) -> list[P.Probe]:
        return self.editor.probes

    @property
    def result(self):
        return self.results.frame

    # -- status and errors ---------------------------------------------------
    def _set_status(self, kind: str, text: str):
        self.status.value = f'<span class="flor-status {kind}">{STATUS[kind]} {esc(text)}</span>'

    def _fail(self, exc: BaseException, context: str = ""):
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        self._set_status("bad", first[:140])
        self.error_out.outputs = ()
        self.error_out.append_display_data(HTML(results.error_html(exc, context)))

    # -- run -----------------------------------------------------------------
    def _on_run(self, label: str | None):
        self.error_out.outputs = ()
        if label is None:
            self.run = None
            self._set_status("ok", f"No recorded runs in {self.store.home}")
            return
        self.select_run(label)

    def select_run(self, label):
        """Fill the panel from run ``label`` (``NAME`` or ``NAME@VERSION``)."""
        run = self.run = self.store.find_run(label)
        self._recorded = P.recorded(run, self.store)
        with self.quiet():
            self._fill_epochs()
        self.editor.set_run(run)  # also updates the estimate, through _on_probes
        self._show_last_result()
        missing = sorted(run.state.get("not_captured") or {})
        if missing:  # replays restore everything else: say what they cannot, before anyone replays
            self._set_status("bad", f"{run.label}: {run.status}, {run.epochs_completed} epochs; not captured: "
                                    f"{', '.join(missing)}")
        else:
            self._set_status("ok", f"{run.label}: {run.status}, {run.epochs_completed} epochs")

    def _on_probes(self):
        running = self.job is not None and self.job.running
        self.replay_button.disabled = bool(self.editor.problems) or running
        self._update_estimate()

    # -- epochs --------------------------------------------------------------
    def _fill_epochs(self):
        n, rec = self.run.epochs_completed, self._recorded
        metrics = [m for m in dict.fromkeys(rec["name"]) if not plots.per_epoch(rec, m).empty]
        self.metric.options = metrics or [("(none)", "")]
        epoch_level = [m for m in metrics if rec[rec["name"] == m]["step"].isna().any()]
        self.metric.value = (epoch_level or metrics or [""])[0]
        self.epoch_slider.min = 0
        self.epoch_slider.max = max(n - 1, 1)
        self.epoch_slider.value = (0, max(n - 1, 0))
        self.epoch_slider.disabled = n == 0
        self.epoch_text.value = P.format_epochs(range(n))
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
        self.curve.value = plots.epoch_curve(self._recorded, self.metric.value or None, selected,
                                             self.run.epochs_completed)

    @guarded
    def _on_slider(self, change):
        """Pick epochs."""
        lo, hi = change["new"]
        hi = min(hi, self.run.epochs_completed - 1)
        with self.quiet():
            self.epoch_text.value = str(lo) if lo == hi else f"{lo}-{hi}"
        self._draw_curve()
        self._update_estimate()

    @guarded
    def _on_epoch_text(self, change):
        """Read the epoch list."""
        try:
            selected = self.selected_epochs()
        except FlorError:  # the estimate says what is wrong with it, next to the Replay button
            selected = []
        if selected and selected == list(range(selected[0], selected[-1] + 1)):
            with self.quiet():
                self.epoch_slider.value = (selected[0], selected[-1])
        self._draw_curve()
        self._update_estimate()

    @guarded
    def _on_metric(self, change):
        """Draw the metric curve."""
        self._draw_curve()

    @guarded
    def _on_workers(self, change):
        """Choose the workers."""
        self._update_estimate()

    # -- estimate and replay -------------------------------------------------
    def _plan(self) -> dict:
        return P.estimate(self.run, self.probes, self._epoch_spec(), self.workers.value or None, self.store)

    def _update_estimate(self):
        if self.run is None:
            return
        try:
            text = self._plan()["text"]
        except P.ProbeError:
            text, bad = "Fix the probe problems marked above before replaying.", True
        except FlorError as e:
            text, bad = str(e), True
        else:
            bad = False
        self.estimate.value = f'<div class="flor-estimate{" flor-problem" if bad else ""}">{esc(text)}</div>'

    @guarded
    def _on_replay(self, _button=None):
        """Start the replay."""
        self.replay()

    def replay(self) -> ReplayJob:
        """Start replaying the selected epochs with the probes in a background thread; returns the job."""
        if self.run is None:
            raise FlorError("Select a run first.")
        if self.job is not None and self.job.running:
            raise FlorError("A replay is already running: wait for it or press Cancel.")
        self.error_out.outputs = ()
        code = P.edited_code(self.run, self.probes)
        plan = self._plan()
        self._chip_order, self._chip_modes = plan["order"], plan["modes"]
        self.progress.max = max(len(plan["order"]), 1)
        self.progress.value = 0
        self.progress.bar_style = "info"
        self.results.clear()
        self.job = ReplayJob(self.run.label, code, self._epoch_spec(), self.store, plan,
                             on_change=self._on_progress, on_done=self._on_done)
        self.replay_button.disabled = True
        self.cancel_button.disabled = False
        self._set_status("busy", f"Replaying epochs {P.format_epochs(plan['epochs'])} of {self.run.label}\u2026")
        self._render_progress(self.job)
        self.job.start()
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

    def _on_progress(self, job: ReplayJob):
        with self._lock:
            if job is self.job:
                self.progress.value = min(len(job.finished_epochs), self.progress.max)
                self._render_progress(job)

    def _render_progress(self, job: ReplayJob):
        fmt, left = P.format_seconds, job.remaining
        if not job.running and job.ended is not None:
            text = f"{fmt(job.elapsed)} in all"
        elif not job.finished_epochs:
            text = f"{fmt(job.elapsed)} elapsed \u00b7 starting workers, re-running setup cells\u2026"
        else:
            text = f"{fmt(job.elapsed)} elapsed" + (f" \u00b7 about {fmt(left)} left" if left is not None else "")
        self.clock.value = f'<span class="flor-muted">{esc(text)}</span>'
        chips = []
        for k in self._chip_order:
            skip = " \u00b7 steps skipped" if self._chip_modes.get(k) == "skip" else ""
            if k in job.finished_epochs:
                chips.append(f'<span class="done">epoch {k} \u2714 {fmt(job.finished_epochs[k])}{skip}</span>')
            elif job.cancelled and not job.running:
                chips.append(f'<span class="lost">epoch {k} cancelled</span>')
            else:
                chips.append(f"<span>epoch {k}{skip}</span>")
        self.chips.value = f'<div class="flor-chips">{"".join(chips)}</div>'

    def _on_done(self, job: ReplayJob):
        with self._lock:
            self.cancel_button.disabled = True
            self.replay_button.disabled = bool(self.editor.problems)
            self._render_progress(job)
            if job.error is None:
                self.progress.bar_style = "success"
                self.progress.value = self.progress.max
                job.result.attrs.setdefault("code", job.code)
                try:
                    self.results.show(job.result)
                except Exception as e:  # noqa: BLE001 - shown in the panel
                    self._fail(e, "Showing the results failed:")
                    return
                fid = job.result.attrs["fidelity"]
                level = fid.get("level", "faithful" if fid["faithful"] else "not faithful")
                word = {"faithful": "faithful", "caveats": "reproduced, with caveats"}.get(level, "NOT faithful")
                self._set_status("ok" if level == "faithful" else "bad",
                                 f"Replayed {self.run.label} in {P.format_seconds(job.elapsed)}: {word}")
            elif isinstance(job.error, ReplayCancelled) or job.cancelled:
                self.progress.bar_style = "warning"
                self._set_status("bad", f"Cancelled after {P.format_seconds(job.elapsed)}; {len(job.finished_epochs)}"
                                        f" of {len(self._chip_order)} epochs had finished")
                self._show_cancelled(job)
            else:
                self.progress.bar_style = "danger"
                self._fail(job.error, "The replay failed:")

    def _show_cancelled(self, job):
        partial = getattr(job.error, "result", None)  # an engine that keeps finished segments attaches them
        if partial is not None:
            self.results.show(partial, note="Cancelled: the results of the epochs that finished.")
            return
        done = P.format_epochs(sorted(job.finished_epochs)) or "none"
        self.results.clear(f'<div class="flor-verdict bad">Cancelled: the workers were stopped. Epochs {esc(done)} '
                           "had finished, but this engine version keeps no values from a cancelled replay; earlier "
                           "results are unchanged in the store. Replay fewer epochs to get results sooner.</div>")

    def _show_last_result(self):
        self.results.clear()
        self.chips.value = self.clock.value = ""
        self.progress.value = 0
        frame = P.last_result(self.run, self.store)
        if frame is not None:
            self.results.show(frame, note=f"Last replay of {self.run.label} (#{frame.attrs['replay']}), from the store.")
