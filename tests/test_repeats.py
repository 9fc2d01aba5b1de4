"""Values logged several times at one (epoch, step) are all kept: in replay results, flor.dataframe,
plots and reports (a ``seq`` column numbers them)."""
from __future__ import annotations

import nbformat
import pandas as pd
import pytest
from conftest import SETUP, TRAIN

import flor_nb as flor
from flor_nb import plots as engine_plots
from flor_nb import api

HELPER = '''
def log_halves(xb):
    """A callback-like helper: one value per micro-batch."""
    for half in xb.split(16):
        flor.log("half_mean", float(half.mean()))
'''
RECORDED = TRAIN.replace('        flor.log("loss", loss.item())\n',
                         '        flor.log("loss", loss.item())\n        log_halves(xb)\n')
PROBED = RECORDED.replace("        log_halves(xb)\n", "        log_halves(xb)\n"
                          "        [flor.log('half_max', float(h.max())) for h in xb.split(16)]\n")


@pytest.fixture
def halves(store):
    cells = [f"EPOCHS = 3\n{SETUP}{HELPER}"]
    ns = {"flor": flor}
    exec(cells[0], ns)
    return flor.record(RECORDED, name="halves", namespace=ns, cells=cells, store=store, overhead=float("inf"))


def test_dataframe_keeps_every_value_at_a_step(halves, store):
    df = flor.dataframe("half_mean", "loss", run="halves", store=store)
    assert list(df.columns[:5]) == ["name", "version", "epoch", "step", "seq"]
    assert len(df) == 3 * 6 * 2 and df["half_mean"].notna().all()
    assert df["seq"].tolist() == [0, 1] * 18
    assert df[df["seq"] == 0]["loss"].notna().all() and df[df["seq"] == 1]["loss"].isna().all()
    stored = [r["value"] for r in store.logs([halves.id], names=["half_mean"])]
    assert df["half_mean"].tolist() == stored


def test_replay_result_keeps_every_value_and_plots_them(halves, store):
    df = flor.replay("halves", code=PROBED, epochs="1-2", store=store)
    fid = df.attrs["fidelity"]
    assert fid["faithful"], df.attrs["verdict"]
    assert fid["metrics"]["half_mean"]["compared"] == 2 * 6 * 2
    assert list(df.columns[:3]) == ["epoch", "step", "seq"]
    steps = df[df["step"].notna()]
    assert len(steps) == 2 * 6 * 2 and steps["half_max"].notna().all() and steps["half_mean"].notna().all()
    recorded = flor.dataframe("half_mean", run="halves", store=store)
    assert steps["half_mean"].tolist() == recorded[recorded["epoch"].isin([1, 2])]["half_mean"].tolist()

    from flor_nb.widgets import plots, results

    (label, xs, ys, per_step), = plots.series(df, "half_max")
    assert len(xs) == 24 and len(set(xs)) == 24 and ys == steps["half_max"].tolist()
    assert [name for name, _ in plots.results(df, ["half_max"])] == ["probes and recorded metrics"]
    table = results.table_html(df, ["half_max"])
    assert ">seq</th>" in table and "26 rows" in table  # 2 epoch-level rows and 24 step values
    assert engine_plots.probe_png(df)[:4] == b"\x89PNG"
    # A probe before or after the loop gives rows with no epoch: in the table, beside (not on) the epoch axes.
    outside = pd.concat([df, pd.DataFrame([{"epoch": None, "step": pd.NA, "seq": 0, "half_max": 7.0}])],
                        ignore_index=True)
    outside.attrs.update(df.attrs)
    assert [lbl for lbl, *_ in plots.series(outside, "half_max")] == [lbl for lbl, *_ in plots.series(df, "half_max")]
    assert [n for n, _ in plots.results(outside, ["half_max"])] == ["probes and recorded metrics"]
    assert "27 rows" in results.table_html(outside, ["half_max"])
    assert engine_plots.probe_png(outside)[:4] == b"\x89PNG"
    again = api.last_result(halves, store)
    assert again["half_max"].dropna().tolist() == steps["half_max"].tolist()


def test_report_lists_every_value(halves, store):
    nb = nbformat.read(flor.report("halves@1", store=store), as_version=4)
    tables = [o["data"]["text/html"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "text/html" in o.get("data", {})]
    step_table = next(t for t in tables if "half_mean" in t and "<th>seq</th>" in t)
    assert step_table.split("<tbody>")[1].count("<tr>") == 36  # 3 epochs x 6 steps x 2 halves
