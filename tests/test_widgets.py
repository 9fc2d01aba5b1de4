"""The replay panel driven as a user would, against real recorded runs (no front end needed)."""
from __future__ import annotations

import base64
import re
import subprocess
import sys
import time

import pytest
from conftest import SETUP, TRAIN, record_with_a_lock, setup_namespace
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
    assert "In[1] of the recording kernel" in panel.editor.deps.get_title(0)
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
    assert panel.curve.selected == [2, 3]
    assert "Replays 2 epochs (2-3) of small@1" in panel.estimate.value
    assert "grad_norm logs at every step" in panel.estimate.value

    _replay(panel)
    assert panel.error_out.outputs == (), _html(panel.error_out)
    assert "Replayed small@1" in panel.status.value and "faithful" in panel.status.value
    # epoch 2 starts from the state kept at the end of epoch 1: nothing else runs
    assert panel.progress.value == panel.progress.max == 2 and panel.progress.bar_style == "success"
    assert "epoch 1" not in panel.chips.value
    assert "epoch 2 \u2714" in panel.chips.value and "epoch 3 \u2714" in panel.chips.value
    assert "Faithful replay" in panel.results.verdict.value and "flor-verdict ok" in panel.results.verdict.value
    assert "\u2714 faithful" in panel.outcome.value and "flor-badge ok" in panel.outcome.value

    df = panel.result
    assert {"grad_norm", "w_norm", "loss", "acc"} <= set(df.columns)
    assert sorted(df["epoch"].unique()) == [2, 3] and df["grad_norm"].notna().sum() == 12
    table = _html(panel.results.table_out)  # the epoch-level values first: one row per epoch
    assert panel.results.rows.value == "epoch" and table.count("<tr>") == 2 + 1
    assert "<th" in table and ">acc</th>" in table and ">loss</th>" not in table
    panel.results.rows.value = "step"
    table = _html(panel.results.table_out)
    assert table.count("<tr>") == 12 + 1 and ">grad_norm</th>" in table and ">acc</th>" not in table
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

    panel.replay_button.click()  # even forced, nothing runs: the error is shown next to the button
    assert panel.job is None and "never closed" in _html(panel.replay_msg)
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
    assert panel.curve.selected == [0, 1, 2, 3, 4] and panel.epoch_text.value == "0-4"
    assert panel.metric.value == "acc" and panel.curve.n_epochs == 5 and panel.curve.label == "acc"
    acc = flor.dataframe("acc", run="small@1").dropna(subset=["acc"])["acc"].tolist()
    assert panel.curve.points == [[e, acc[e]] for e in range(5)]
    panel.curve.selected = [1, 2]  # what a click and a drag on the curve send
    assert panel.epoch_text.value == "1-2" and "Replays 2 epochs (1-2)" in panel.estimate.value
    panel.curve.selected = [0, 3, 4]  # shift/ctrl-clicks
    assert panel.epoch_text.value == "0, 3-4" and "Replays 3 epochs (0, 3-4)" in panel.estimate.value
    panel.epoch_text.value = "1-2"
    assert panel.curve.selected == [1, 2]
    panel.epoch_text.value = "7"
    assert "out of range" in panel.estimate.value and "flor-problem" in panel.estimate.value
    panel.replay_button.click()
    assert panel.job is None and "Epoch 7 is out of range" in _html(panel.replay_msg)
    assert "not started" in panel.outcome.value
    panel.metric.value = "loss"
    assert panel.curve.label == "loss (mean per epoch)" and len(panel.curve.points) == 5


def test_errors_in_user_code_show_their_traceback(recorded):
    panel = ui()
    panel.editor.code_lines.value = 13
    panel.editor.code_box.value = 'flor.log("ratio", acc / (epoch - 2))'
    panel.editor.add_button.click()
    panel.epoch_text.value = "2"
    _replay(panel)
    shown = _html(panel.replay_msg)  # right under the Replay button, not at the top of the panel
    assert panel.error_out.outputs == ()
    assert "ZeroDivisionError" in shown and "Traceback" in shown and "&lt;flor replay small@1&gt;" in shown
    assert "line 14" in shown  # the probe's own line in the replayed cell
    assert panel.progress.bar_style == "danger" and "flor-status bad" in panel.status.value
    assert "failed in epoch 2" in panel.outcome.value and "flor-badge bad" in panel.outcome.value
    assert "failed after" in panel.clock.value and "epoch 2 \u2716 failed" in panel.chips.value
    assert not panel.replay_button.disabled and panel.cancel_button.disabled


def test_results_sort_and_filter(recorded):
    panel = ui()
    panel.editor.code_lines.value = 8
    panel.editor.code_box.value = 'flor.log("gn", grad_norm(model))'
    panel.editor.add_button.click()
    panel.epoch_text.value = "4"
    _replay(panel)
    panel.results.rows.value = "step"
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


def _slow_run(store):
    ns = setup_namespace(4)
    ns["time"] = time
    flor.record(SLOW, name="slow", namespace=ns, cells=[f"import time\nEPOCHS = 4\n{SETUP}"], store=store,
                overhead=float("inf"))
    return ui("slow")


def _until(predicate, timeout=60):
    deadline = time.time() + timeout
    while not predicate() and time.time() < deadline:
        time.sleep(0.05)
    return predicate()


def test_cancel_keeps_the_finished_epochs_and_says_so(store):
    panel = _slow_run(store)
    panel.workers.value = 1
    panel.epoch_text.value = "0,2-3"  # two segments: epoch 0 (short) finishes, epochs 2-3 are cancelled
    panel.replay_button.click()
    assert panel.cancel_button.disabled is False
    assert _until(lambda: panel.job.kept), "no segment finished"
    panel.cancel_button.click()
    assert panel.wait(30)
    assert "Cancelled" in panel.status.value and panel.progress.bar_style == "warning"
    assert "epoch 0 \u2714" in panel.chips.value and "epoch 3 cancelled" in panel.chips.value
    df = panel.result  # the kept epoch, in the table, under a partial-results banner, never a green one
    assert sorted(df["epoch"].unique()) == [0] and len(df) == 6 + 1
    assert "Cancelled: partial results for epoch 0 of 0, 2-3" in panel.results.verdict.value
    assert "flor-verdict warn" in panel.results.verdict.value and "flor-verdict ok" not in panel.results.verdict.value
    assert "partial: epoch 0 kept" in panel.outcome.value and "flor-badge warn" in panel.outcome.value
    assert _html(panel.results.table_out).count("<tr>") == 1 + 1  # the epoch-level row of epoch 0
    assert "Cancelled: partial results for epoch 0" in panel.snapshot_html()  # the static copy says so too
    assert not panel.replay_button.disabled and panel.cancel_button.disabled
    # the store agrees: the replay is cancelled, with epoch 0 kept, and the panel shows it when reopened
    rep = flor.replays("slow")[-1]
    assert rep["status"] == "cancelled" and rep["fidelity"]["cancelled"]["kept"] == [0]
    assert rep["fidelity"]["level"] == "caveats"
    assert "cancelled replay (partial)" in ui("slow").results.verdict.value
    panel.epoch_text.value = "3"  # the executor is rebuilt: the next replay works
    _replay(panel)
    assert "Faithful" in panel.results.verdict.value


def test_cancel_inside_a_segment_keeps_nothing_and_never_looks_faithful(store):
    panel = _slow_run(store)
    panel.workers.value = 1
    panel.replay_button.click()  # epochs 0-3: one segment
    assert _until(lambda: panel.job.ran), "no epoch ran"
    panel.cancel_button.click()
    assert panel.wait(30)
    assert panel.job.elapsed < 0.6 * 4 + 10
    assert "ran, not kept" in panel.chips.value and "\u2714" not in panel.chips.value
    assert "nothing kept" in panel.outcome.value and "Faithful" not in panel.results.verdict.value
    assert "flor-verdict warn" in panel.results.verdict.value and "no values were stored" in panel.results.verdict.value
    rep = flor.replays("slow")[-1]
    assert rep["status"] == "cancelled" and rep["fidelity"]["cancelled"]["kept"] == []
    assert "Replay cancelled before any epoch's results were kept" in flor.verdict.verdict_text(rep["fidelity"])


def test_unknown_run_and_empty_store(store):
    panel = ui()
    assert panel.run is None and "No recorded runs" in panel.status.value and panel.replay_button.disabled
    with pytest.raises(UnknownRunError, match="No run 'nope'"):
        ui("nope")


def test_engine_imports_no_ui():
    code = ("import sys, flor_nb, flor_nb.probes, flor_nb.replay\n"
            "bad = [m for m in ('IPython', 'ipywidgets', 'flor_nb.widgets') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _record_again(store, lr=0.05, code=TRAIN):
    flor.runtime.IDLE.args.clear()
    ns = setup_namespace(5)
    flor.runtime.IDLE.args.clear()
    flor.arg("lr", lr)
    return flor.record(code, name="small", namespace=ns, cells=[f"EPOCHS = 5\n{SETUP}"], store=store)


def test_runs_appear_by_themselves_and_deselecting_keeps_them(recorded, store):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        panel = ui()
        assert [v for _, v in panel.picker.select.options] == ["small@1"]
        assert "size" in panel.picker.header.value and " kB" in panel.picker.select.options[0][0].replace("\xa0", " ")
        _record_again(store)
        shell.run_cell("1 + 1")  # any cell: the panel looks at the store after it
        assert [v for _, v in panel.picker.select.options] == ["small@2", "small@1"]
        assert panel.run.label == "small@1"  # the run being worked on stays selected
        panel.picker.select.value = ()
        assert "No run selected: select one above" in panel.status.value and "2 recorded" in panel.status.value
        assert "No recorded runs" not in panel.status.value and panel.replay_button.disabled
        panel.picker.select.value = ("small@2",)
        assert panel.run.label == "small@2" and not panel.replay_button.disabled
    finally:
        InteractiveShell.clear_instance()


def test_compare_legend_names_the_hyperparameter_that_differs(recorded, store):
    from flor_nb.widgets.runs import differing_args

    _record_again(store, lr=0.05)
    runs = [store.find_run("small@1"), store.find_run("small@2")]
    assert differing_args(runs) == {"small@1": "small@1 (lr=0.1)", "small@2": "small@2 (lr=0.05)"}
    panel = ui()
    panel.picker.select.value = ("small@2", "small@1")
    assert len(_pngs(panel.picker.compare_out)) == 1


def test_probes_follow_the_run_to_its_next_version(recorded, store):
    panel = ui("small@1")
    panel.editor.code_lines.value = 13
    panel.editor.code_box.value = 'flor.log("w_norm", weight_norm(model))'
    panel.editor.add_button.click()
    _record_again(store, code="\n# a comment line added above the loop" + TRAIN)
    panel.picker.refresh(select="small@2")
    assert panel.run.label == "small@2"
    assert [(p.title, p.line) for p in panel.probes] == [("w_norm", 14)]  # follows its line, one lower now
    assert "carried over from small@1" in panel.status.value
    assert P.load(store.find_run("small@2"), store)[0].line == 14


def test_the_where_control_speaks_of_steps_and_epochs(recorded):
    panel = ui()
    panel.editor.code_lines.value = 10  # flor.log("loss"): the last line of the step loop
    labels = [label for label, _ in panel.editor.where.options]
    assert labels[0].startswith("every step (inside for xb, yb in loader:)")
    assert labels[1].startswith("once per epoch (inside for epoch in range(EPOCHS):)")
    assert not any("spaces" in label for label in labels) and panel.editor.where.layout.display is None
    panel.editor.code_lines.value = 8  # inside the step loop only: one level, so no control
    assert panel.editor.where.layout.display == "none"


def test_delete_asks_first_then_frees_the_space(recorded, store):
    _record_again(store)
    panel = ui()
    panel.picker.select.value = ("small@1",)
    panel.picker.delete_button.click()
    assert panel.picker.confirm_box.layout.display == "flex"
    assert "Delete small@1" in panel.picker.confirm.value and "frees about" in panel.picker.confirm.value
    panel.picker.confirm_no.click()
    assert [r.label for r in store.all_runs()] == ["small@1", "small@2"]
    panel.picker.delete_button.click()
    panel.picker.confirm_yes.click()
    assert [r.label for r in store.all_runs()] == ["small@2"]
    assert [v for _, v in panel.picker.select.options] == ["small@2"] and panel.run.label == "small@2"
    assert "Deleted small@1; freed" in panel.status.value


def test_static_copy_holds_the_last_results(recorded):
    panel = ui()
    panel.editor.kind.value = "weight_norm"
    panel.editor.add_button.click()
    panel.epoch_text.value = "1"
    _replay(panel)
    page = panel.snapshot_html()
    assert f'class="flor-static" data-panel="{panel.model_id}"' in page
    assert "Faithful replay" in page and ">weight_norm</th>" in page and 'src="data:image/png;base64,' in page
    assert "run this cell again for the live panel" in page


def test_report_button_links_a_visible_report(recorded, store, tmp_path):
    panel = ui()
    panel.report_button.click()
    assert panel.error_out.outputs == ()
    assert (tmp_path / "flor_reports" / "small@1.ipynb").exists() and (tmp_path / "flor_reports" / "small@1.html").exists()
    assert 'href="flor_reports/small@1.ipynb"' in panel.report_link.value


def test_a_replay_that_is_not_faithful_is_shown_red(recorded):
    """A probe drawing from the loader's generator changes training: the panel must not show it like a success."""
    panel = flor.ui()
    panel.editor.code_lines.value = 13
    panel.editor.code_box.value = 'flor.log("draw", float(torch.rand(1, generator=g)))'
    panel.editor.add_button.click()
    assert panel.editor.problems == []
    panel.epoch_text.value = "2"
    _replay(panel)
    verdict = panel.results.verdict.value
    assert "Replay NOT faithful: torch.Generator " in verdict, verdict
    assert "flor-verdict bad" in verdict and "flor-verdict ok" not in verdict
    assert "NOT faithful" in panel.outcome.value and "flor-badge bad" in panel.outcome.value
    assert "flor-status bad" in panel.status.value


def test_what_was_not_captured_is_shown_before_any_replay(store):
    record_with_a_lock(store)
    panel = ui("locked")
    assert "flor-status warn" in panel.status.value and "not captured: guard.lock" in panel.status.value
