"""Probes: placing them in a recorded cell (probes), checking them before replay (probe_check), presets,
memory (the store), and what a replay would do (plan.estimate via api.estimate)."""
from __future__ import annotations

import pickle

import pytest

import flor_nb as flor
from flor_nb import api, plan
from flor_nb import presets as PS
from flor_nb import probe_check as C
from flor_nb import probes as P
from flor_nb.errors import FlorError
from flor_nb.edits import added_lines
from flor_nb.plan import parse_epochs

# Line numbers of conftest.TRAIN (its first line is empty):
#  4 for epoch in range(EPOCHS):      6 for xb, yb in loader:       8 opt.zero_grad(); loss.backward()
#  9 opt.step()   10 flor.log("loss")  11 sched.step()   13 acc = ...   16 flor.log("acc", acc)


def test_apply_inserts_after_the_line_with_its_indentation(recorded):
    code = recorded.code
    edited, spans = P.apply(code, [P.Probe(8, 'flor.log("gn", grad_norm(model))'), P.Probe(0, "import math")])
    lines = edited.splitlines()
    assert lines[0] == "import math" and spans[1] == (1, 1)
    assert spans[0] == (10, 10)
    assert lines[9] == '        flor.log("gn", grad_norm(model))'
    assert lines[8].strip() == "opt.zero_grad(); loss.backward()"
    assert added_lines(code, edited) == [1, 10]


def test_probes_at_the_same_line_keep_their_order_and_dedent(recorded):
    edited, spans = P.apply(recorded.code, [P.Probe(10, "flor.log('a', 1)"), P.Probe(10, "flor.log('b', 2)", indent=4)])
    lines = edited.splitlines()
    assert spans == [(11, 11), (12, 12)]
    assert lines[10] == "        flor.log('a', 1)" and lines[11] == "    flor.log('b', 2)"
    assert lines[12].strip() == "sched.step()"


def test_insertion_point_moves_to_the_end_of_a_statement_and_lists_levels(recorded):
    code = "for epoch in range(3):\n    x = f(1,\n          2)\n    for s in range(2):\n        y = s\nz = 1\n"
    after, indent, levels = P.insertion_point(code, 2)
    assert (after, indent) == (3, 4)
    after, indent, levels = P.insertion_point(code, 4)  # a loop header: into its body
    assert (after, indent) == (4, 8) and [i for _, i in levels] == [8]
    after, indent, levels = P.insertion_point(code, 5)  # the last line of both loops: any level is valid
    assert (after, indent) == (5, 8)
    assert [i for _, i in levels] == [8, 4, 0]
    assert levels[0][0] == "inside for s in range(2):"


def test_check_reports_syntax_errors_at_the_probe_line(recorded):
    problems = C.check(recorded, [P.Probe(8, "flor.log('gn', grad_norm(model)")])
    assert len(problems) == 1
    assert problems[0].kind == "syntax" and problems[0].line == 8 and problems[0].probe == 0
    assert "never closed" in problems[0].message


def test_check_reports_undefined_names_but_knows_the_run(recorded):
    ok = P.Probe(8, "flor.log('x', grad_norm(model) + loss.item() + EPOCHS + len(history) + np.pi)")
    bad = P.Probe(13, "flor.log('x', gradnorm(model) + undefined_thing)")
    problems = C.check(recorded, [ok, bad])
    assert [(p.probe, p.kind, p.line) for p in problems] == [(1, "name", 13)]
    assert "gradnorm, undefined_thing" in problems[0].message


def test_check_rejects_a_probe_that_would_become_the_loop(recorded):
    problems = C.check(recorded, [P.Probe(3, "for i in range(2): flor.log('i', i)")])
    assert problems and problems[0].kind == "loop" and "comprehension" in problems[0].message


def test_check_blames_a_bad_indentation_on_its_probe(recorded):
    problems = C.check(recorded, [P.Probe(5, "x = 1", indent=0)])
    assert problems[0].probe == 0 and problems[0].kind == "syntax" and "indentation" in problems[0].message
    with pytest.raises(C.ProbeError) as e:
        C.edited_code(recorded, [P.Probe(5, "x = 1", indent=0)])
    assert e.value.problems[0].line == 5
    assert pickle.loads(pickle.dumps(e.value)).problems[0].line == 5


def test_presets_fill_in_the_run_and_replay_faithfully(recorded, store):
    objs = PS.objects(recorded, store)
    assert objs["model"] == {"kind": "module", "modules": ["", "0", "3"]}
    assert objs["opt"]["kind"] == "optimizer"
    probes = [PS.preset(recorded, key, objs=objs) for key in PS.PRESETS]
    by_key = {p.preset: p for p in probes}
    assert by_key["grad_norm"].line == 8 and "model.parameters()" in by_key["grad_norm"].code
    assert by_key["lr"].code == 'flor.log("lr", opt.param_groups[0]["lr"])' and by_key["lr"].indent == 4
    assert by_key["activation"].line == 6 and 'get_submodule("0")' in by_key["activation"].code
    assert by_key["class_acc"].params == {"name": "class_acc", "outputs": "model(X)", "labels": "y"}
    assert C.check(recorded, probes) == []
    df = flor.replay("small", code=C.edited_code(recorded, probes), epochs="1,3")
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]
    lr = df.dropna(subset=["lr"]).set_index("epoch")["lr"]
    assert lr.to_dict() == {1: 0.05, 3: 0.025}  # StepLR halves it every 2 epochs; logged after sched.step()
    grad = df[df["step"].notna()]["grad_norm"]
    assert len(grad) == 12 and (grad > 0).all()
    hist = df.dropna(subset=["weight_hist"])["weight_hist"].iloc[0]
    assert set(hist) == {"0.weight", "0.bias", "3.weight", "3.bias"} and sum(hist["0.weight"]["counts"]) == 320
    assert set(df.dropna(subset=["class_acc"])["class_acc"].iloc[0]) == {"0", "1"}
    # every forward call, each kept: 6 steps, the evaluation and class_acc's extra forward, per epoch
    assert df["act.0.std"].notna().sum() == 16 and df.dropna(subset=["act.0.std"])["seq"].max() == 1
    assert df.dropna(subset=["grad_hist"]).shape[0] == 12


def test_preset_parameters_can_be_changed(recorded):
    p = PS.preset(recorded, "activation", {"module": "3", "name": "logits"}, line=5)
    assert p.line == 5 and p.params["module"] == "3"
    assert 'flor.log("logits.mean"' in p.code and 'get_submodule("3")' in p.code
    with pytest.raises(FlorError, match="Presets: grad_norm"):
        PS.preset(recorded, "nope")


def test_probes_are_remembered_per_run_version(recorded, store):
    probes = [P.Probe(8, 'flor.log("gn", grad_norm(model))'), PS.preset(recorded, "lr")]
    path = P.save(recorded, probes, store)
    assert path == store.home / "probes" / "small@1.json"
    assert P.load(recorded, store) == probes
    assert P.load(flor.get_run("small@1"), store)[1].preset == "lr"
    assert [p.title for p in probes] == ["gn", "lr"]


def test_estimate_says_what_replay_will_do(recorded, store):
    est = api.estimate(recorded, [P.Probe(8, 'flor.log("gn", grad_norm(model))')], "1,3-4", 1, store)
    assert est["epochs"] == [1, 3, 4] and est["workers"] == 1
    assert "Replays 3 epochs (1, 3-4) of small@1 with 1 worker" in est["text"]
    assert "epochs 3-4 from the checkpoint after epoch 2" in est["text"]
    assert est["step_loop"] == "run in epochs 1, 3-4 (gn logs at every step)"
    assert "a recorded epoch took" in est["text"]
    est = api.estimate(recorded, [PS.preset(recorded, "lr")], "2", None, store)
    assert est["step_loop"].startswith("skipped in every epoch") and est["workers"] == 1
    assert est["order"] == [2] and est["modes"] == {2: "skip"}
    with pytest.raises(C.ProbeError):
        api.estimate(recorded, [P.Probe(8, "flor.log(")], "2", None, store)
    with pytest.raises(FlorError, match="out of range"):
        api.estimate(recorded, [], "9", None, store)


def test_runs_table_and_last_result(recorded, store):
    table = api.runs(store)
    assert table.loc[0, "name"] == "small" and table.loc[0, "arg.lr"] == 0.1
    assert 0 < table.loc[0, "last.acc"] <= 1 and "last.loss" in table
    assert api.last_result(recorded, store) is None
    df = flor.replay("small", code=C.edited_code(recorded, [P.Probe(8, 'flor.log("gn", grad_norm(model))')]),
                     epochs="2-3")
    again = api.last_result(recorded, store)
    assert again.attrs["verdict"] == df.attrs["verdict"] and again.attrs["probes"] == ["gn"]
    assert list(again["gn"].dropna()) == list(df["gn"].dropna())
    assert list(again["loss"].dropna()) == list(df["loss"].dropna())
    rec = api.recorded(recorded, store)
    assert set(rec["name"]) == {"loss", "acc"} and len(rec) == 5 * 6 + 5


def test_format_helpers():
    assert plan.format_epochs([1, 4, 7, 8, 9]) == "1, 4, 7-9"
    assert parse_epochs(plan.format_epochs([0, 2, 3]), 5) == [0, 2, 3]
    assert plan.format_seconds(0.0123) == "12 ms" and plan.format_seconds(75) == "75 s"
    assert plan.format_seconds(3725) == "1 h 02 min"


def test_a_replay_runs_on_to_the_next_recorded_check_unless_it_is_far():
    """Iteration loops are digested every few dozen units; on a busy machine the gap grows. Replaying
    70-90 with checks at 69 and 120 runs on to 120 (so 70-90 are verified) when that is affordable."""
    ckpts = {-1: "start", 69: "end"}
    near = plan.plan(list(range(70, 91)), ckpts, checks=[69, 120], unit_seconds=0.1)
    assert (near[0].last, near[0].keep) == (120, list(range(70, 91)))
    far = plan.plan(list(range(70, 91)), ckpts, checks=[69, 200], unit_seconds=1.0)  # 110 s more, 5x the asked
    assert far[0].last == 90
    unknown = plan.plan(list(range(70, 91)), ckpts, checks=[69, 120], unit_seconds=None)
    assert unknown[0].last == 90


def test_an_unchecked_end_names_the_check_to_replay_to():
    from flor_nb.verdict import verdict_text

    fidelity = {"level": "caveats", "metrics": {"loss": {"verdict": "exact", "compared": 21}}, "epochs": [70, 90],
                "unit": "iterations", "state": {"epochs": [69], "unchecked": [70, 90], "streams": 101,
                                                "diverged": [], "next_check": 120}}
    text = verdict_text(fidelity)
    assert "NOT checked at or after iteration 70, 90" in text
    assert "replay through iteration 120, the next recorded check" in text
