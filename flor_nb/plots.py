"""Matplotlib figures of replay results, rendered to PNG bytes (no pyplot state, no backend change)."""
from __future__ import annotations

import io

import pandas as pd
from matplotlib.figure import Figure


def probe_png(frame: pd.DataFrame) -> bytes | None:
    """One panel per probe: per-step values over the replayed epochs, or one point per epoch."""
    probes = [p for p in frame.attrs.get("probes", []) if p in frame and pd.api.types.is_numeric_dtype(frame[p])]
    if not probes:
        return None
    fig = Figure(figsize=(6.5, 2.6 * len(probes)), layout="constrained")
    axes = fig.subplots(len(probes), 1, squeeze=False)[:, 0]
    for ax, name in zip(axes, probes):
        rows = frame.dropna(subset=[name])
        outside = rows[rows["epoch"].isna()]  # logged before or after the loop: no place on an epoch axis
        rows = rows[rows["epoch"].notna()]
        if rows.empty:
            ax.text(0.5, 0.5, ", ".join(f"{v:.6g}" for v in outside[name]), ha="center", va="center", fontsize=14,
                    transform=ax.transAxes)
            ax.set_axis_off()
            ax.set_title(f"{name} (hindsight, outside the loop, {frame.attrs.get('run', '')})")
            continue
        frac = repeat_fraction(rows)
        if rows["step"].notna().any():
            for epoch, part in rows.groupby("epoch"):
                ax.plot(part["step"].astype(float) + frac[part.index], part[name], marker=".", lw=1,
                        label=f"epoch {epoch}")
            ax.set_xlabel("step" + (" (repeats within a step spread across it)" if frac.any() else ""))
            ax.legend(fontsize="small")
        else:
            ax.plot(rows["epoch"].astype(float) + frac, rows[name], marker="o")
            ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        extra = f"; outside the loop: {', '.join(f'{v:.4g}' for v in outside[name])}" if len(outside) else ""
        ax.set_title(f"{name} (hindsight, {frame.attrs.get('run', '')}{extra})")
        ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def repeat_fraction(rows: pd.DataFrame) -> pd.Series:
    """Per row, ``seq / values at its (epoch, step)``: 0 for a single value, so repeats sit side by side."""
    if rows.empty or "seq" not in rows:
        return pd.Series(0.0, index=rows.index)
    keys = [rows["epoch"], rows["step"].astype("Float64").fillna(-1)]
    count = rows.groupby(keys)["seq"].transform("count")
    return (rows["seq"] / count).astype(float)
