"""The panel as plain HTML: what a saved notebook shows when the live widget cannot be rebuilt.

JupyterLab saves no widget state by default, so after a kernel shutdown and a
reload a widget output reads "Error displaying widget: model not found". The
panel therefore also writes this snapshot as an ordinary HTML output beside
the widget (updated after every replay through its display id): the live
panel's stylesheet hides it, and when the widget is gone it is what remains,
with the run, the verdict, the values and the plots of the last replay.
"""
from __future__ import annotations

import base64

from . import plots
from .results import split_levels, table_html, verdict_html
from .style import CSS, esc

MAX_STATIC_ROWS = 200


def hide_rule(panel_id: str) -> str:
    """CSS, carried by the live panel, that hides its own snapshot while the widget is alive."""
    return f'<style>.flor-static[data-panel="{esc(panel_id)}"] {{ display: none; }}</style>'


def snapshot_html(panel_id: str, run_label: str | None, status: str, frame=None, note: str = "") -> str:
    """The snapshot: header, status, and the last result (verdict, tables by level, plots)."""
    parts = [CSS, f'<div class="flor-static" data-panel="{esc(panel_id)}">',
             '<div class="flor-title">flor_nb replay panel <span class="flor-muted">(static view: '
             "run this cell again for the live panel)</span></div>",
             f'<div class="flor-muted">{esc(status or run_label or "no run selected")}</div>']
    if frame is not None:
        if note:
            parts.append(f'<div class="flor-muted">{esc(note)}</div>')
        parts.append(verdict_html(frame.attrs))
        levels = split_levels(frame) if not frame.empty else {}
        probes = frame.attrs.get("probes", [])
        for level, part in levels.items():
            parts.append(f"<h4>Per {level} ({len(part)} rows{', first ' + str(MAX_STATIC_ROWS) if len(part) > MAX_STATIC_ROWS else ''})</h4>")
            parts.append(table_html(part.head(MAX_STATIC_ROWS), probes))
        for title, data in plots.results(frame, probes):
            b64 = base64.b64encode(data).decode("ascii")
            parts.append(f'<img class="flor-plot" alt="{esc(title)}" src="data:image/png;base64,{b64}">')
    parts.append("</div>")
    return "".join(parts)
