"""Replay results: the fidelity verdict, the values table, the plots, and errors, as HTML and widgets."""
from __future__ import annotations

import math
import traceback
from numbers import Number

import ipywidgets as W
import pandas as pd
from IPython.display import HTML, Image

from flor_nb.errors import FlorError, ReplayError
from flor_nb.plan import format_epochs

from . import plots
from .common import Callbacks, guarded, layout
from .style import esc, section

MAX_ROWS = 5000


def cell(v) -> str:
    """A short, readable form of one logged value."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, Number):
        return f"{v:.6g}" if isinstance(v, float) else str(v)
    if isinstance(v, dict):
        if v and all(isinstance(h, dict) and "counts" in h for h in v.values()):
            return f"histogram \u00d7 {len(v)} layers"
        items = list(v.items())
        body = ", ".join(f"{k}: {cell(x)}" for k, x in items[:6])
        return "{" + body + (", \u2026" if len(items) > 6 else "") + "}"
    if isinstance(v, (list, tuple)):
        return f"[{len(v)} values]" if len(v) > 6 else "[" + ", ".join(cell(x) for x in v) + "]"
    text = str(v)
    return text if len(text) <= 60 else text[:57] + "\u2026"


def sortable(frame: pd.DataFrame, column: str | None, ascending: bool = True) -> pd.DataFrame:
    """``frame`` sorted by ``column`` (numbers by value, missing last); None keeps the replay order."""
    if not column or column not in frame:
        return frame
    key = frame[column].map(lambda v: v if isinstance(v, Number) and not isinstance(v, bool) else float("nan"))
    order = pd.to_numeric(key, errors="coerce").sort_values(ascending=ascending, na_position="last", kind="stable").index
    return frame.loc[order]


def split_levels(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``{"epoch": ..., "step": ...}``: epoch-level rows (no step) and step rows, each with only the
    columns that hold values at that level (so neither table is mostly empty)."""
    out = {}
    if "step" not in frame:
        return {"epoch": frame}
    for level, mask in (("epoch", frame["step"].isna()), ("step", frame["step"].notna())):
        part = frame[mask]
        if part.empty:
            continue
        keep = [c for c in part.columns if c in ("epoch", "seq") or (c == "step" and level == "step")
                or part[c].notna().any()]
        if level == "epoch" or ("seq" in part and not (part["seq"] > 0).any()):
            keep = [c for c in keep if c != "seq" or (part["seq"] > 0).any()]
        out[level] = part[keep]
    return out


def table_html(frame: pd.DataFrame, probes=(), sort_by=None, ascending=True, rows="all") -> str:
    """Rows of the result (up to MAX_ROWS) in a scrolling box, probe columns marked.

    ``rows``: ``all``, ``epoch`` (epoch-level values only) or ``step`` (per-step values only);
    a level shows only the columns with values at that level.
    """
    view = frame
    if rows in ("epoch", "step", "steps"):
        view = split_levels(frame).get("step" if rows == "steps" else rows, frame.iloc[0:0])
    view = sortable(view, sort_by, ascending)
    shown = view.head(MAX_ROWS)
    head = "".join(f'<th class="{"probe" if c in probes else ""}" title="{"hindsight probe" if c in probes else ""}">'
                   f"{esc(c)}</th>" for c in shown.columns)
    body = []
    for values in shown.itertuples(index=False, name=None):
        tds = []
        for v in values:
            text = cell(v)
            tds.append('<td class="na">·</td>' if text == "" else f"<td>{esc(text)}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    note = (f'<div class="flor-muted">{len(view)} rows \u00d7 {len(view.columns)} columns'
            + (f"; showing the first {MAX_ROWS} (all of them are in <code>panel.result</code>)" if len(view) > MAX_ROWS else "")
            + (" \u00b7 \u25c6 marks hindsight probes" if any(c in probes for c in shown.columns) else "")
            + "</div>")
    return (f'<div class="flor-table-wrap"><table class="dataframe"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>{note}')


def verdict_level(attrs: dict) -> str:
    """ok, warn or bad: faithful; caveats or cancelled; not faithful."""
    fid = attrs.get("fidelity") or {}
    level = fid.get("level", "faithful" if fid.get("faithful") else "not faithful")
    if level == "not faithful":
        return "bad"
    if level == "caveats" or fid.get("cancelled") or attrs.get("cancelled"):
        return "warn"
    return "ok"


def verdict_html(attrs: dict) -> str:
    """The fidelity verdict: a banner, then one row per recorded metric."""
    fid = attrs.get("fidelity") or {}
    rows = []
    for name, m in (fid.get("metrics") or {}).items():
        first = m.get("first_mismatch")
        where = ""
        if first:
            step = "" if first.get("step") is None else f", step {first['step']}"
            where = f"epoch {first['epoch']}{step}: recorded {cell(first['recorded'])}, replayed {cell(first['replayed'])}"
        diff = "" if m["verdict"] == "exact" else cell(m.get("max_abs_diff"))
        rows.append(f"<tr><td><b>{esc(name)}</b></td><td>{esc(m['verdict'])}</td><td>{m['exact']}/{m['compared']}</td>"
                    f"<td>{esc(diff)}</td><td>{esc(where)}</td></tr>")
    table = ("<table><tr><th>recorded metric</th><th>verdict</th><th>exact</th><th>max |diff|</th>"
             f"<th>first mismatch</th></tr>{''.join(rows)}</table>") if rows else ""
    secs = fid.get("seconds")
    took = f" Replay took {secs:.1f} s." if isinstance(secs, (int, float)) else ""
    state = fid.get("state") or {}
    if state.get("diverged"):
        rows = "".join(f"<tr><td>epoch {e['epoch']}</td><td>{esc('step loop exit' if e['where'] == 'step' else e['where'])}"
                       f"</td><td>{esc(', '.join(e['differ'] + e['missing']))}</td></tr>" for e in state["diverged"])
        table += f"<table><tr><th>diverged</th><th>where</th><th>streams</th></tr>{rows}</table>"
    css = verdict_level(attrs)
    icon = {"ok": "\u2714", "warn": "\u26a0", "bad": "\u2716"}[css]
    return (f'<div class="flor-verdict {css}">{icon} {esc(attrs.get("verdict", ""))}{esc(took)}'
            f"{table}</div>")


def error_html(exc: BaseException, context: str = "") -> str:
    """An error as the user should see it: the message, and the traceback of their code (folded) if any."""
    if isinstance(exc, ReplayError):
        message, tb = exc.args[0], exc.traceback_text
    elif isinstance(exc, FlorError):
        message, tb = str(exc), ""
    else:
        message = f"{type(exc).__name__}: {exc}"
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    head = f"<b>{esc(context)}</b> " if context else ""
    pre = f"<details open><summary>Traceback</summary><pre>{esc(tb)}</pre></details>" if tb else ""
    return f'<div class="flor-error">\u2716 {head}{esc(message)}{pre}</div>'


def python_snippet(frame) -> str:
    """The replay as a ``flor.replay`` call, for a notebook cell or a script."""
    code = (frame.attrs.get("code") or "").strip("\n")
    body = f"'''{code}\n'''" if "'''" not in code else repr(code + "\n")
    epochs = format_epochs(frame.attrs.get("epochs", []))
    text = (f"import flor_nb as flor\ncode = {body}\n"
            f'df = flor.replay("{frame.attrs.get("run", "")}", code=code, epochs="{epochs}")\n'
            'print(df.attrs["verdict"])')
    return ('<details><summary class="flor-muted">The same replay in Python</summary>'
            f'<pre class="flor-code" style="padding:6px 10px">{esc(text)}</pre></details>')


class ResultsView(W.VBox, Callbacks):
    """The verdict, the values grouped by level (per epoch, per step; sortable, every row) and the plots."""

    def __init__(self, on_fail):
        super().__init__()
        self._fail = on_fail
        self.frame = None
        self.verdict = W.HTML()
        self.rows = W.ToggleButtons(options=[("per epoch", "epoch"), ("per step", "step")], value="epoch",
                                    style={"button_width": "150px"}, tooltips=[
                                        "values logged once per epoch (outside the step loop)",
                                        "values logged at every step"])
        self.sort_by = W.Dropdown(description="sort by", options=[("replay order", "")], layout=layout(width="240px"))
        self.order = W.ToggleButtons(options=[("\u2191 asc", True), ("\u2193 desc", False)], value=True,
                                     style={"button_width": "70px"})
        for w in (self.rows, self.sort_by, self.order):
            w.observe(self._on_view, "value")
        self.table_out = W.Output(layout=layout(width="100%"))
        self.plots_out = W.Output(layout=layout(width="100%"))
        self.plots_out.add_class("flor-plot")
        self.snippet = W.HTML()
        self.controls = W.HBox([self.rows, self.sort_by, self.order],
                               layout=layout(flex_flow="row wrap", align_items="center", display="none"))
        self.children = [
            W.HTML(section("5", "Results", "hindsight probes (\u25c6) beside the recorded metrics")),
            self.verdict,
            self.controls, self.table_out, self.plots_out, self.snippet,
        ]
        self.add_class("flor-results")

    def clear(self, message: str = ""):
        self.frame = None
        self.verdict.value = message
        self.controls.layout.display = "none"
        self.table_out.outputs = ()
        self.plots_out.outputs = ()
        self.snippet.value = ""

    def show(self, frame, note: str = ""):
        """Show a result frame (as :func:`flor_nb.replay` returns it)."""
        self.frame = frame
        self.controls.layout.display = None
        head = f'<div class="flor-muted">{esc(note)}</div>' if note else ""
        self.verdict.value = head + verdict_html(frame.attrs)
        levels = split_levels(frame) if not frame.empty else {}
        with self.quiet():
            self.rows.options = [(f"per {k} ({len(v)} row{'s' if len(v) != 1 else ''})", k) for k, v in levels.items()] or [("no rows", "epoch")]
            self.rows.value = next(iter(levels), "epoch")
            self._sort_options()
        self._render_table()
        self.plots_out.outputs = ()
        for _title, data in plots.results(frame, frame.attrs.get("probes", [])):
            self.plots_out.append_display_data(Image(data=data, format="png"))
        self.snippet.value = python_snippet(frame)

    def _sort_options(self):
        view = split_levels(self.frame).get(self.rows.value) if self.frame is not None and not self.frame.empty else None
        cols = list(view.columns) if view is not None else []
        self.sort_by.options = [("replay order", "")] + [(c, c) for c in cols]
        self.sort_by.value = ""

    def _render_table(self):
        if self.frame is None:
            return
        if self.frame.empty:
            html = '<div class="flor-muted">No values: no epoch finished.</div>'
        else:
            html = table_html(self.frame, self.frame.attrs.get("probes", []), self.sort_by.value or None,
                              self.order.value, self.rows.value)
        self.table_out.outputs = ()
        self.table_out.append_display_data(HTML(html))

    @guarded
    def _on_view(self, change):
        """Show the table."""
        if change["owner"] is self.rows:
            with self.quiet():
                self._sort_options()
        self._render_table()
