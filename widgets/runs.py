"""The runs table: one selectable row per recorded run version; two selected are compared on one plot."""
from __future__ import annotations

import math

import ipywidgets as W
import pandas as pd
from IPython.display import Image

from flor_nb import probes as P

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
    """Aligned text rows (newest first) and their header line, from :func:`flor_nb.probes.runs_table`."""
    args = [c for c in table.columns if c.startswith("arg.")]
    lasts = [c for c in table.columns if c.startswith("last.")]
    cells = []
    for _, r in table.iloc[::-1].iterrows():
        hyper = " ".join(f"{c[4:]}={_fmt(r[c])}" for c in args if _fmt(r[c]))
        metrics = " ".join(f"{c[5:]}={_fmt(r[c])}" for c in lasts if _fmt(r[c]))
        dur = "" if pd.isna(r["duration_s"]) else P.format_seconds(float(r["duration_s"]))
        cells.append([f"{r['name']}@{r['version']}", STATUS.get(r["status"], r["status"]),
                      r["started"].strftime("%b %d %H:%M"), dur, str(r["epochs"]), hyper, metrics])
    head = ["run", "status", "started", "duration", "epochs", "hyperparameters", "last recorded values"]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(head)]

    def line(values):
        return (NBSP * 2).join(v.ljust(w) if i < len(values) - 1 else v
                               for i, (v, w) in enumerate(zip(values, widths))).replace(" ", NBSP)

    return [line(c) for c in cells], line(head)


class RunPicker(W.VBox, Callbacks):
    """Runs of a store as a multi-select table; calls ``on_select(label)`` for the run to show."""

    def __init__(self, store, on_select, on_fail):
        super().__init__()
        self.store, self.on_select, self.on_fail = store, on_select, on_fail
        self.header = W.HTML()
        self.select = W.SelectMultiple(options=[], rows=4, layout=W.Layout(width="100%"))
        self.select.add_class("flor-mono")
        self.select.observe(self._on_change, "value")
        self.refresh_button = W.Button(description="Refresh", icon="refresh", layout=W.Layout(width="100px"),
                                       tooltip="Reload the runs from the store")
        self.refresh_button.on_click(lambda _b: self.refresh())
        self.compare_out = W.Output()
        self.primary: str | None = None
        self.children = [W.HBox([self.header, self.refresh_button],
                                layout=W.Layout(justify_content="space-between", align_items="flex-end")),
                         self.select, self.compare_out]

    def refresh(self, select=None):
        """Reload the runs; select ``select`` (``NAME`` or ``NAME@VERSION``), else keep or take the newest."""
        try:
            table = P.runs_table(self.store)
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
        self.header.value = (f'<div class="flor-mono" style="font-family:var(--flor-code);font-size:12px;'
                             f'white-space:pre;padding-left:4px"><b>{esc(head)}</b></div>')
        with self.quiet():
            self.select.options = list(zip(text, labels))
            self.select.rows = max(2, min(len(labels), 6))
            self.select.value = (want,) if want else ()
        self.primary = None
        self._changed(self.select.value)

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
                curves = {label: P.recorded(self.store.find_run(label), self.store) for label in chosen[:4]}
                self.compare_out.append_display_data(Image(data=plots.compare(curves), format="png"))
        except Exception as e:  # noqa: BLE001 - shown in the panel
            self.on_fail(e, "Selecting the run failed")
