"""The runs table: one selectable row per recorded run version, its size, delete with confirmation;
two selected are compared on one plot whose legend names the hyperparameters that differ."""
from __future__ import annotations

import math

import ipywidgets as W
import pandas as pd
from IPython.display import Image

import flor_nb
from flor_nb import api
from flor_nb.housekeeping import format_bytes
from flor_nb.plan import format_seconds

from . import plots
from .common import NBSP, Callbacks
from .style import esc

STATUS = {"finished": "\u2714 finished", "failed": "\u2716 failed", "interrupted": "\u25a0 interrupted",
          "running": "\u2026 running"}


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def rows(table: pd.DataFrame) -> tuple[list[str], str]:
    """Aligned text rows (newest first) and their header line, from :func:`flor_nb.runs`."""
    args = [c for c in table.columns if c.startswith("arg.")]
    lasts = [c for c in table.columns if c.startswith("last.")]
    cells = []
    for _, r in table.iloc[::-1].iterrows():
        hyper = " ".join(f"{c[4:]}={_fmt(r[c])}" for c in args if _fmt(r[c]))
        metrics = " ".join(f"{c[5:]}={_fmt(r[c])}" for c in lasts if _fmt(r[c]))
        dur = "" if pd.isna(r["duration_s"]) else format_seconds(float(r["duration_s"]))
        size = "" if pd.isna(r["size_mb"]) else format_bytes(float(r["size_mb"]) * 1e6)
        cells.append([f"{r['name']}@{r['version']}", STATUS.get(r["status"], r["status"]),
                      r["started"].strftime("%b %d %H:%M"), dur, str(r["epochs"]), size, hyper, metrics])
    head = ["run", "status", "started", "duration", "epochs", "size", "hyperparameters", "last recorded values"]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(head)]

    def line(values):
        return (NBSP * 2).join(v.ljust(w) if i < len(values) - 1 else v
                               for i, (v, w) in enumerate(zip(values, widths))).replace(" ", NBSP)

    return [line(c) for c in cells], line(head)


def differing_args(runs) -> dict[str, str]:
    """{label: "lr=0.05, wd=0"} with only the hyperparameters whose values differ between ``runs``."""
    keys = sorted({k for r in runs for k in r.args})
    differ = [k for k in keys if len({repr(r.args.get(k)) for r in runs}) > 1]
    return {r.label: r.label + (f" ({', '.join(f'{k}={_fmt(r.args.get(k))}' for k in differ)})" if differ else "")
            for r in runs}


class RunPicker(W.VBox, Callbacks):
    """Runs of a store as a multi-select table; calls ``on_select(label)`` for the run to show
    (None when the selection is emptied) and ``on_status(kind, text)`` to report."""

    def __init__(self, store, on_select, on_fail, on_status=None):
        super().__init__()
        self.store, self.on_select, self.on_fail = store, on_select, on_fail
        self.on_status = on_status or (lambda kind, text: None)
        self.header = W.HTML()
        self.select = W.SelectMultiple(options=[], rows=4, layout=W.Layout(width="100%"))
        self.select.add_class("flor-mono")
        self.select.add_class("flor-runs")
        self.select.observe(self._on_change, "value")
        self.refresh_button = W.Button(description="Refresh", icon="refresh", layout=W.Layout(width="100px"),
                                       tooltip="Reload the runs from the store (new runs also appear by themselves "
                                               "after each cell)")
        self.refresh_button.on_click(lambda _b: self.refresh())
        self.delete_button = W.Button(description="Delete\u2026", icon="trash", layout=W.Layout(width="100px"),
                                      tooltip="Delete the selected runs (asks first)")
        self.delete_button.on_click(self._on_delete)
        self.confirm = W.HTML()
        self.confirm_yes = W.Button(description="Delete", button_style="danger", icon="trash")
        self.confirm_no = W.Button(description="Keep")
        self.confirm_yes.on_click(self._on_confirm)
        self.confirm_no.on_click(lambda _b: self._ask(None))
        self.confirm_box = W.HBox([self.confirm, self.confirm_yes, self.confirm_no],
                                  layout=W.Layout(align_items="center", display="none"))
        self.confirm_box.add_class("flor-confirm")
        self.compare_out = W.Output()
        self.compare_out.add_class("flor-plot")
        self.primary: str | None = None
        self.labels: list[str] = []
        self._pending: list[str] = []
        self._signature = None
        self.children = [W.HBox([self.header, W.HBox([self.refresh_button, self.delete_button])],
                                layout=W.Layout(justify_content="space-between", align_items="flex-end")),
                         self.select, self.confirm_box, self.compare_out]

    def refresh(self, select=None):
        """Reload the runs; select ``select`` (``NAME`` or ``NAME@VERSION``), else keep or take the newest."""
        try:
            self._signature = self.store.signature()
            table = api.runs(self.store)
            labels = [f"{n}@{v}" for n, v in zip(table["name"], table["version"])][::-1]
            text, head = rows(table)
            if select is not None:
                want = self.store.find_run(select).label
            elif self.primary in labels:
                want = self.primary
            else:
                want = labels[0] if labels else None
        except Exception as e:  # noqa: BLE001 - shown in the panel
            self.on_fail(e, "Loading the runs failed")
            return
        self.labels = labels
        self.header.value = (f'<div style="font-family:var(--flor-code);font-size:12px;'
                             f'white-space:pre;padding-left:4px"><b>{esc(head)}</b></div>')
        with self.quiet():
            self.select.options = list(zip(text, labels))
            self.select.rows = max(2, min(len(labels), 6))
            self.select.value = (want,) if want else ()
        self.delete_button.disabled = not labels
        if self.primary != want:  # the run shown changes: fill the panel again; else only redraw the comparison
            self.primary = None
        self._changed(self.select.value)

    def refresh_if_changed(self) -> bool:
        """Reload when a run was added, deleted or changed status since the last look (cheap to call).

        The run being worked on stays selected; a new run is listed and named in the status line.
        """
        try:
            changed = self.store.signature() != self._signature
        except Exception:  # noqa: BLE001 - a store being written: look again next time
            return False
        if changed:
            before = set(self.labels)
            self.refresh()
            fresh = [label for label in self.labels if label not in before]
            if fresh:
                self.on_status("ok", f"New run {', '.join(fresh)}: select it above to replay it")
        return changed

    def _on_change(self, change):
        if not self._muted:
            self._changed(change["new"])

    def _changed(self, value):
        try:
            chosen = list(value)
            if self.primary not in chosen:
                new = [v for v in chosen if v != self.primary]
                self.primary = new[-1] if new else None
                self.on_select(self.primary)
            self.compare_out.outputs = ()
            if len(chosen) >= 2:
                runs = [self.store.find_run(label) for label in chosen[:4]]
                curves = {r.label: api.recorded(r, self.store) for r in runs}
                self.compare_out.append_display_data(Image(data=plots.compare(curves, legend=differing_args(runs)),
                                                           format="png"))
        except Exception as e:  # noqa: BLE001 - shown in the panel
            self.on_fail(e, "Selecting the run failed")

    # -- delete, with a confirmation -------------------------------------------
    def _on_delete(self, _button=None):
        chosen = list(self.select.value)
        if not chosen:
            self.on_status("warn", "Select the runs to delete first")
            return
        self._ask(chosen)

    def _ask(self, labels):
        self._pending = list(labels or [])
        if not self._pending:
            self.confirm_box.layout.display = "none"
            self.confirm.value = ""
            return
        try:
            usage = {u.run.label: u for u in flor_nb.housekeeping.usage(self.store).runs}
            frees = sum(usage[label].unique for label in self._pending if label in usage)
        except Exception:  # noqa: BLE001 - the question still makes sense without a size
            frees = None
        size = f" (frees about {format_bytes(frees)})" if frees is not None else ""
        self.confirm.value = (f'<span class="flor-badge bad">Delete {esc(", ".join(self._pending))}{esc(size)}? '
                              "Its checkpoints, logs, replays and probes go; this cannot be undone.</span>")
        self.confirm_box.layout.display = "flex"

    def _on_confirm(self, _button=None):
        labels, self._pending = self._pending, []
        self.confirm_box.layout.display = "none"
        try:
            freed = flor_nb.delete(*labels, store=self.store)
        except Exception as e:  # noqa: BLE001 - shown in the panel
            self.on_fail(e, "Deleting failed")
            return
        self.primary = None
        self.refresh()
        self.on_status("ok", str(freed).removeprefix("flor_nb: ").capitalize())
