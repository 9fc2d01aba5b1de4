"""The replay panel driven as a user would, against real recorded runs (no front end needed)."""
from __future__ import annotations

import base64
import re
import subprocess
import sys
import time

import pytest
from conftest import SETUP, TRAIN, setup_namespace
from flor_nb.widgets import Panel, ui

import flor_nb as flor
from flor_nb import probes as P
from flor_nb.errors import UnknownRunError

pytestmark = pytest.mark.timeout(120)


def _html(out) -> str:
    return "".join(o["data"].get("text/html", "") for o in out.outputs)


def _pngs(out) -> list[bytes]:
    data = [o["data"]["image/png"] for o in out.outputs if "image/png" in o["data"]]
    return [base64.b64decode(d) if isinstance(d, str) else d for d in data]


def _label(panel, line) -> str:
    return {v: k for k, v in panel.editor.code_lines.options}[line]


def _replay(panel, timeout=90):
    panel.replay_button.click()
    assert panel.wait(timeout), "replay did not finish"
    return panel


def test_panel_replays_a_preset_and_a_free_probe(recorded):
    panel = flor.ui()
    assert isinstance(panel, Panel) and panel.run.label == "small@1"
    assert panel.picker.select.value == ("small@1",)
    assert "lr=0.1" in panel.picker.select.options[0][0] and "acc=" in panel.picker.select.options[0][0]
    assert "In[1]" in panel.editor.deps.get_title(0)
    assert _label(panel, 8).split()[1:] == ["opt.zero_grad();", "loss.backward()"]

    panel.editor.kind.value = "grad_norm"  # the preset goes after loss.backward() by itself
    assert panel.editor.code_lines.value == 8 and "model.parameters()" in panel.editor.code_box.value
    panel.editor.add_button.click()
    panel.editor.code_lines.value = 13
    panel.editor.code_box.value = 'flor.log("w_norm", weight_norm(model))'
    panel.editor.add_button.click()
    assert [p.title for p in panel.probes] == ["grad_norm", "w_norm"] and panel.editor.problems == []
    assert "probe: grad_norm" in _label(panel, 8) and "probe: w_norm" in _label(panel, 13)
    assert 'flor.log(&quot;w_norm&quot;' in panel.editor.preview.value

    panel.epoch_text.value = "2-3"
    assert panel.epoch_slider.value == (2, 3)
    assert "Replays 2 epochs (2-3) of small@1" in panel.estimate.value
    assert "grad_norm log" in panel.estimate.value or "grad_norm logs" in panel.estimate.value

    _replay(panel)
    assert panel.error_out.outputs == (), _html(panel.error_out)
    assert "Replayed small@1" in panel.status.value and "faithful" in panel.status.value
    # epoch 2 starts from the state kept at the end of epoch 1: nothing else runs
    assert panel.progress.value == panel.progress.max == 2 and panel.progress.bar_style == "success"
    assert "epoch 1" not in panel.chips.value
    assert "epoch 2 \u2714" in panel.chips.value and "epoch 3 \u2714" in panel.chips.value
    assert "Faithful replay" in panel.results.verdict.value

    df = panel.result
    assert {"grad_norm", "w_norm", "loss", "acc"} <= set(df.columns)
    assert sorted(df["epoch"].unique()) == [2, 3] and df["grad_norm"].notna().sum() == 12
    table = _html(panel.results.table_out)
    assert 'class="dataframe"' in table and table.count("<tr>") == len(df) + 1
    figures = _pngs(panel.results.plots_out)
    assert figures and all(f.startswith(b"\x89PNG") for f in figures)
    assert "flor.replay(&quot;small@1&quot;" in panel.results.snippet.value

    # the panel is a view: the engine's own API returns the same values
    same = flor.dataframe("grad_norm", run="small@1").dropna(subset=["grad_norm"])
    assert list(same["grad_norm"]) == list(df["grad_norm"].dropna())


def test_probe_errors_show_at_their_line_before_anything_runs(recorded):
    panel = ui("small")
    panel.editor.code_lines.value = 8
    panel.editor.code_box.value = 'flor.log("gn", grad_norm(model)'
    assert "never closed" in panel.editor.draft_msg.value
    panel.editor.add_button.click()
    panel.editor.code_lines.value = 13
    panel.editor.code_box.value = 'flor.log("x", undefined_thing)'
    panel.editor.add_button.click()
    assert [p.kind for p in panel.editor.problems] == ["syntax", "name"]
    assert "\u2716" in _label(panel, 8) and "never closed" in _label(panel, 8)
    assert "undefined_thing is not defined" in _label(panel, 13)
    assert "undefined_thing is not defined" in panel.editor.preview.value and 'class="err"' in panel.editor.preview.value
    assert panel.replay_button.disabled and "Fix the probe problems" in panel.estimate.value

    panel.replay_button.click()  # even forced, nothing runs: the error is shown in the panel
    assert panel.job is None and "never closed" in _html(panel.error_out)
    assert "flor-status bad" in panel.status.value

    panel.editor.probe_list.children[0].children[0].click()  # Remove
    panel.editor.probe_list.children[0].children[0].click()
    assert panel.probes == [] and not panel.replay_button.disabled
    assert "Replays" in panel.estimate.value


def test_probes_are_remembered_for_the_run(recorded, store):
    panel = ui()
    panel.editor.kind.value = "lr"
    panel.editor.add_button.click()
    assert P.load(recorded, store)[0].preset == "lr"
    again = ui("small@1")
    assert [p.title for p in again.probes] == ["lr"]
    assert "probe: lr" in _label(again, 16)
    again.editor.probe_list.children[0].children[1].click()  # Edit: back into the form
    assert again.editor.kind.value == "lr" and "param_groups" in again.editor.code_box.value and again.probes == []
    assert P.load(recorded, store) == []


def test_two_selected_runs_are_compared(recorded, store):
    ns = setup_namespace(5)
    flor.record(TRAIN.replace("flor.log(\"acc\", acc)", "flor.log(\"acc\", acc * 0.9)"), name="small", namespace=ns,
                cells=[f"EPOCHS = 5\n{SETUP}"], store=store)
    panel = ui()
    assert panel.run.label == "small@2" and [v for _, v in panel.picker.select.options] == ["small@2", "small@1"]
    assert panel.picker.compare_out.outputs == ()
    panel.picker.select.value = ("small@2", "small@1")
    assert panel.run.label == "small@2"  # the first selection still fills the panel
    assert len(_pngs(panel.picker.compare_out)) == 1
    panel.picker.select.value = ("small@1",)
    assert panel.run.label == "small@1" and panel.picker.compare_out.outputs == ()


def test_epoch_controls_and_the_metric_curve(recorded):
    panel = ui()
    assert panel.epoch_slider.value == (0, 4) and panel.epoch_text.value == "0-4"
    assert panel.metric.value == "acc" and bytes(panel.curve.value).startswith(b"\x89PNG")
    before = panel.curve.value
    panel.epoch_slider.value = (1, 2)
    assert panel.epoch_text.value == "1-2" and bytes(panel.curve.value) != bytes(before)
    panel.epoch_text.value = "0,3-4"
    assert panel.epoch_slider.value == (1, 2)  # a list is not a range: the slider stays
    assert "Replays 3 epochs (0,3-4)" in panel.estimate.value
    panel.epoch_text.value = "7"
    assert "out of range" in panel.estimate.value and "flor-problem" in panel.estimate.value
    panel.replay_button.click()
    assert panel.job is None and "Epoch 7 is out of range" in _html(panel.error_out)
    panel.metric.value = "loss"
    assert bytes(panel.curve.value).startswith(b"\x89PNG")


def test_errors_in_user_code_show_their_traceback(recorded):
    panel = ui()
    panel.editor.code_lines.value = 13
    panel.editor.code_box.value = 'flor.log("ratio", acc / (epoch - 2))'
    panel.editor.add_button.click()
    panel.epoch_text.value = "2"
    _replay(panel)
    shown = _html(panel.error_out)
    assert "ZeroDivisionError" in shown and "Traceback" in shown and "&lt;flor replay small@1&gt;" in shown
    assert "line 14" in shown  # the probe's own line in the replayed cell
    assert panel.progress.bar_style == "danger" and "flor-status bad" in panel.status.value
    assert not panel.replay_button.disabled and panel.cancel_button.disabled


def test_results_sort_and_filter(recorded):
    panel = ui()
    panel.editor.code_lines.value = 8
    panel.editor.code_box.value = 'flor.log("gn", grad_norm(model))'
    panel.editor.add_button.click()
    panel.epoch_text.value = "4"
    _replay(panel)
    panel.results.sort_by.value = "gn"
    panel.results.order.value = False
    first = re.search(r"<tbody><tr>(.*?)</tr>", _html(panel.results.table_out)).group(1)
    best = max(panel.result["gn"].dropna())
    assert f"{best:.6g}" in first
    panel.results.rows.value = "epoch"
    assert _html(panel.results.table_out).count("<tr>") == 2  # header and the one epoch-level row


def test_results_come_back_when_the_panel_is_reopened(recorded):
    panel = ui()
    panel.editor.kind.value = "weight_norm"
    panel.editor.add_button.click()
    panel.epoch_text.value = "1"
    _replay(panel)
    values = list(panel.result["weight_norm"].dropna())
    reopened = ui("small")
    assert "Last replay of small@1" in reopened.results.verdict.value and "Faithful" in reopened.results.verdict.value
    assert list(reopened.result["weight_norm"].dropna()) == values
    assert 'class="dataframe"' in _html(reopened.results.table_out) and _pngs(reopened.results.plots_out)


SLOW = TRAIN.replace("    flor.log(\"acc\", acc)", "    flor.log(\"acc\", acc)\n    time.sleep(0.6)")


def test_cancel_stops_the_workers(store):
    ns = setup_namespace(4)
    ns["time"] = time
    flor.record(SLOW, name="slow", namespace=ns, cells=[f"import time\nEPOCHS = 4\n{SETUP}"], store=store)
    panel = ui("slow")
    panel.workers.value = 1
    panel.replay_button.click()
    assert panel.cancel_button.disabled is False
    deadline = time.time() + 60
    while not panel.job.finished_epochs and time.time() < deadline:
        time.sleep(0.05)
    assert panel.job.finished_epochs, "no epoch finished"
    panel.cancel_button.click()
    assert panel.wait(30)
    assert "Cancelled" in panel.status.value and panel.progress.bar_style == "warning"
    assert "cancelled" in panel.chips.value and "epoch 0 \u2714" in panel.chips.value
    assert not panel.replay_button.disabled and panel.cancel_button.disabled
    assert panel.job.elapsed < 0.6 * 4 + 10
    panel.epoch_text.value = "3"  # the executor is rebuilt: the next replay works
    _replay(panel)
    assert "Faithful" in panel.results.verdict.value


def test_unknown_run_and_empty_store(store):
    panel = ui()
    assert panel.run is None and "No recorded runs" in panel.status.value
    with pytest.raises(UnknownRunError, match="No run 'nope'"):
        ui("nope")


def test_engine_imports_no_ui():
    code = ("import sys, flor_nb, flor_nb.probes, flor_nb.replay\n"
            "bad = [m for m in ('IPython', 'ipywidgets', 'flor_nb.widgets') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
