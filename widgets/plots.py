"""Figures for the panel, rendered to PNG bytes.

Only ``matplotlib.figure.Figure`` with an Agg canvas is used: no pyplot state,
no backend switch, safe from the replay thread. The panel shows the bytes as
ordinary ``image/png`` outputs, so they stay in a saved notebook. Backgrounds
are transparent and text is black: in a dark theme the panel's stylesheet
inverts the images (see ``style.py``), so they follow the theme.
"""
from __future__ import annotations

import io
import math
from numbers import Number

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from flor_nb.plots import repeat_fraction

PROBE = "#1f77b4"
RECORDED = "#7f7f7f"
PICK = "#ff7f0e"
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def png(fig: Figure, dpi: int = 96) -> bytes:
    """The figure as PNG bytes (then it is dropped: nothing is kept by pyplot)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", transparent=True)
    return buf.getvalue()


def _number(v) -> bool:
    return isinstance(v, Number) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


def is_histogram(values) -> bool:
    """A column logged by the histogram presets: ``{layer: {"min", "max", "counts"}}``."""
    v = next((x for x in values if isinstance(x, dict)), None)
    return bool(v) and all(isinstance(h, dict) and "counts" in h for h in v.values())


def per_epoch(long: pd.DataFrame, metric: str) -> pd.Series:
    """One value per epoch for a recorded metric: the epoch-level value, else the mean over steps."""
    rows = long[(long["name"] == metric) & long["value"].map(_number)]
    rows = rows[rows["epoch"].notna()]
    if rows.empty:
        return pd.Series(dtype=float)
    level = rows[rows["step"].isna()]
    src = level if not level.empty else rows
    return src.groupby(src["epoch"].astype(int))["value"].agg(lambda s: float(pd.to_numeric(s).mean()))


def curve_points(long: pd.DataFrame, metric: str | None, n_epochs: int) -> list[list]:
    """``[[epoch, value or None], ...]`` for every epoch of the run: what the epoch picker draws."""
    values = per_epoch(long, metric) if metric else pd.Series(dtype=float)
    if values.empty:
        return []
    return [[e, float(values[e]) if e in values.index else None] for e in range(n_epochs)]


def _ticks(n: int) -> list[int]:
    step = max(1, math.ceil(n / 20))
    return list(range(0, n, step))


def _style(ax):
    ax.grid(alpha=0.25, lw=0.6)
    ax.tick_params(labelsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _positions(frame: pd.DataFrame) -> pd.Series:
    """x for each row: the i-th replayed epoch spans [i, i+1) (gaps between epochs are closed up);
    steps spread over it; epoch-level values sit at its middle. Values repeated at one step
    (``seq`` 0, 1, ...) spread over that step's share."""
    order = {e: i for i, e in enumerate(sorted(frame["epoch"].astype(int).unique()))}
    base = frame["epoch"].astype(int).map(order).astype(float)
    steps = frame["step"]
    n = steps.groupby(frame["epoch"]).transform(lambda s: (s.max() + 1) if s.notna().any() else 1)
    n = n.fillna(1).astype(float)
    within = repeat_fraction(frame) + 0.5 / _repeats(frame)  # 0.5 without repeats: the middle of the step
    x = base + (steps.astype("Float64").fillna(-1).astype(float) + within) / n
    return x.where(steps.notna(), base + within)


def _repeats(frame: pd.DataFrame) -> pd.Series:
    if "seq" not in frame:
        return pd.Series(1.0, index=frame.index)
    keys = [frame["epoch"], frame["step"].astype("Float64").fillna(-1)]
    return frame.groupby(keys)["seq"].transform("count").astype(float)


def _gapped(epochs, xs, ys):
    """Break a line where the replayed epochs are not consecutive (a NaN between them)."""
    out_x, out_y, prev = [], [], None
    for e, x, y in zip(epochs, xs, ys):
        if prev is not None and e > prev + 1:
            out_x.append(float("nan"))
            out_y.append(float("nan"))
        out_x.append(x)
        out_y.append(y)
        prev = e
    return out_x, out_y


def series(frame: pd.DataFrame, column: str) -> list[tuple[str, list, list, bool]]:
    """Plottable lines of one result column: (label, x, y, step_level). Dicts of numbers expand. Rows logged
    before or after the loop (no epoch) have no place on the axis: the results table shows them."""
    frame = frame[frame["epoch"].notna()]
    x = _positions(frame)
    out = []
    col = frame[column]
    both = frame.loc[col.notna(), "step"].notna().any() and frame.loc[col.notna(), "step"].isna().any()
    for level, mask in (("steps", frame["step"].notna()), ("epoch", frame["step"].isna())):
        suffix = (" (per step)" if level == "steps" else " (epoch-level)") if both else ""
        sub, xs, ep = col[mask], x[mask], frame["epoch"][mask].astype(int)
        nums = sub.map(_number)
        if nums.any():
            gx, gy = _gapped(list(ep[nums]), list(xs[nums]), [float(v) for v in sub[nums]])
            out.append((column + suffix, gx, gy, level == "steps"))
        dicts = sub[sub.map(lambda v: isinstance(v, dict) and v and all(_number(u) for u in v.values()))]
        for key in sorted({k for d in dicts for k in d}, key=str)[:8]:
            keep = dicts.map(lambda d, key=key: key in d)
            idx = dicts.index[keep]
            gx, gy = _gapped(list(ep[idx]), list(xs[idx]), [float(d[key]) for d in dicts[keep]])
            out.append((f"{column}[{key}]{suffix}", gx, gy, level == "steps"))
    return out


def results(frame: pd.DataFrame, probes: list[str], max_panels: int = 12) -> list[tuple[str, bytes]]:
    """Figures for a replay result: each probe over the replayed epochs/steps, recorded metrics beside."""
    frame = frame[frame["epoch"].notna()]  # before or after the loop: in the results table, not on an epoch axis
    if frame.empty:
        return []
    frame = frame.reset_index(drop=True)
    hists = [c for c in probes if c in frame and is_histogram(frame[c].dropna())]
    scalar_cols = [c for c in probes if c in frame and c not in hists]
    recorded_cols = [c for c in frame.columns if c not in ("epoch", "step", "seq") and c not in probes]
    panels = []
    for c in scalar_cols:
        lines = series(frame, c)
        if lines:
            panels.append((c, "probe", lines))
    for c in recorded_cols:
        lines = series(frame, c)
        if lines:
            panels.append((c, "recorded", lines))
    figures = []
    if panels:
        panels = panels[:max_panels]
        cols = 2 if len(panels) > 1 else 1
        rows = math.ceil(len(panels) / cols)
        fig = Figure(figsize=(9.6 if cols == 2 else 6.4, 2.5 * rows))
        epochs = sorted(frame["epoch"].astype(int).unique())
        for i, (name, kind, lines) in enumerate(panels):
            ax = fig.add_subplot(rows, cols, i + 1)
            color = PROBE if kind == "probe" else RECORDED
            multi = len(lines) > 1
            for j, (label, xs, ys, steps) in enumerate(lines):
                c = COLORS[j % len(COLORS)] if multi else color
                style = "-" if steps and len(xs) > 12 else "-o"
                ax.plot(xs, ys, style, color=c, lw=1.3, ms=3.5, label=label if multi else None)
            for i_e in range(1, len(epochs)):
                gap = epochs[i_e] > epochs[i_e - 1] + 1
                ax.axvline(i_e, color="#999999" if gap else "#cccccc", lw=0.6, ls="--" if gap else "-")
            every = max(1, len(epochs) // 12)
            ax.set_xticks([i_e + 0.5 for i_e in range(0, len(epochs), every)])
            ax.set_xticklabels([str(k) for k in epochs[::every]])
            ax.set_xlim(0, len(epochs))
            ax.set_title(f"{name}  ({'hindsight probe' if kind == 'probe' else 'recorded'})", fontsize=9, loc="left",
                         fontweight="bold" if kind == "probe" else "normal")
            ax.set_xlabel("epoch" + (" (dashed: epochs skipped)" if epochs[-1] - epochs[0] + 1 > len(epochs) else ""),
                          fontsize=8)
            if multi:
                ax.legend(fontsize=7, frameon=False, ncols=min(len(lines), 3))
            _style(ax)
        fig.tight_layout()
        figures.append(("probes and recorded metrics", png(fig)))
    for c in hists:
        figures.append((c, histograms(frame, c)))
    return figures


def histograms(frame: pd.DataFrame, column: str, max_layers: int = 8) -> bytes:
    """Per-layer histograms of a histogram probe: the last value logged in each epoch, one line per epoch."""
    rows = frame[frame[column].map(lambda v: isinstance(v, dict))]
    last = rows.groupby("epoch").tail(1)
    layers = list(dict.fromkeys(k for d in last[column] for k in d))[:max_layers]
    cols = min(4, max(1, len(layers)))
    nrows = math.ceil(len(layers) / cols) or 1
    fig = Figure(figsize=(2.6 * cols, 2.1 * nrows + 0.3))
    cmap = __import__("matplotlib").colormaps["viridis"]
    epochs = list(last["epoch"].astype(int))
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for j, (epoch, d) in enumerate(zip(epochs, last[column])):
            h = d.get(layer)
            if not h:
                continue
            counts = h["counts"]
            lo, hi = float(h["min"]), float(h["max"])
            width = (hi - lo) / len(counts) if hi > lo else 1.0
            xs = [lo + width * (b + 0.5) for b in range(len(counts))]
            ax.step(xs, counts, where="mid", color=cmap(j / max(len(epochs) - 1, 1)), lw=1.2,
                    label=f"epoch {epoch}")
        ax.set_title(layer, fontsize=8, loc="left")
        _style(ax)
        if i == 0:
            ax.legend(fontsize=6, frameon=False)
    fig.suptitle(f"{column}: histogram per layer (last value in each epoch)", fontsize=9, x=0.01, ha="left")
    fig.tight_layout()
    return png(fig)


def compare(curves: dict[str, pd.DataFrame], max_metrics: int = 4, legend: dict | None = None) -> bytes:
    """Recorded metrics of several runs on shared axes: ``{label: recorded long frame}``;
    ``legend`` maps a label to its legend text (e.g. with the hyperparameters that differ)."""
    legend = legend or {}
    metrics = []
    for long in curves.values():
        for m in dict.fromkeys(long["name"]):
            if m not in metrics and not per_epoch(long, m).empty:
                metrics.append(m)
    metrics = metrics[:max_metrics] or [None]
    fig = Figure(figsize=(4.2 * min(len(metrics), 2), 2.6 * math.ceil(len(metrics) / 2)))
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(math.ceil(len(metrics) / 2), min(len(metrics), 2), i + 1)
        for j, (label, long) in enumerate(curves.items()):
            values = per_epoch(long, m) if m else pd.Series(dtype=float)
            if not values.empty:
                ax.plot(values.index, values.values, "-o", ms=3, lw=1.4, color=COLORS[j % len(COLORS)],
                        label=legend.get(label, label))
        steps_only = m is not None and all(
            long[(long["name"] == m)]["step"].notna().all() for long in curves.values() if (long["name"] == m).any())
        ax.set_title((m or "no recorded metric") + (" (mean over each epoch's steps)" if steps_only else ""),
                     fontsize=9, loc="left")
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, frameon=False)
        _style(ax)
    fig.tight_layout()
    return png(fig)
