"""A helper whose code after its step loop reads what the loop set (``total += loss.item()`` in the loop,
``return total / len(loader)`` after it): a replay that skipped the step loop would run that code on the values
from before the loop. The recording keeps them with the step loop's exit state, so a replay can skip it; where
it could not keep them (a run recorded before, a value it cannot pickle), the step loop runs, and the plan says
why."""
from __future__ import annotations

import pytest

import flor_nb as flor
from test_liveness_helper import HELPERS, TRAIN, record, values


AVG = '''
def train(model, loader, opt, epoch):
    model.train()
    total = 0.0
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        total += loss.item()
    return total / len(loader)
''' + HELPERS[HELPERS.index("\n\ndef test("):]
AVG_TRAIN = TRAIN.replace("    train(model", "    avg = train(model").replace("    sched.step()\n", "")


@pytest.mark.parametrize("recorded, probe", [
    (AVG_TRAIN, AVG_TRAIN.replace('    flor.log("acc"', '    flor.log("avg", avg)\n    flor.log("acc"')),
    # the average never reaches the namespace: before, a faithful verdict came with averages of 0.0
    (TRAIN.replace("    sched.step()\n", ""), TRAIN.replace("    sched.step()\n", "").replace(
        "    train(model, loader, optimizer, epoch)", '    flor.log("avg", train(model, loader, optimizer, epoch))')),
])
def test_a_helper_whose_code_after_the_step_loop_reads_what_the_loop_set_skips_it_with_them(store, recorded, probe):
    """Skipping the step loop without them would leave ``total`` at 0.0 and log an average of 0.0."""
    run = record(store, "run", recorded, AVG)
    assert run.state["loops"]["helper"]["carry"] == ["total"]
    record(store, "truth", probe, AVG)
    df = flor.replay("run", code=probe, epochs="1-2", store=store)
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]
    assert "2 with the step loop skipped" in df.attrs["fidelity"]["plan"], df.attrs["fidelity"]["plan"]
    assert values(df, "avg") == [v for v in values(flor.dataframe("avg", run="truth", store=store), "avg")
                                 if v[0] in (1, 2)]


def test_a_helper_whose_variables_were_not_kept_runs_its_step_loop(store):
    """A run recorded before they were kept (no ``carry`` in its loops), and epochs where they could not be."""
    probe = AVG_TRAIN.replace('    flor.log("acc"', '    flor.log("avg", avg)\n    flor.log("acc"')
    run = record(store, "run", AVG_TRAIN, AVG)
    record(store, "truth", probe, AVG)
    want = [v for v in values(flor.dataframe("avg", run="truth", store=store), "avg") if v[0] in (1, 2)]
    loops = {**run.state["loops"], "helper": {k: v for k, v in run.state["loops"]["helper"].items() if k != "carry"}}
    store.update_run(run.id, state={**run.state, "loops": loops})
    df = flor.replay("run", code=probe, epochs="1-2", store=store)
    assert "train() reads total after its step loop, which sets it" in df.attrs["fidelity"]["plan"]
    assert df.attrs["fidelity"]["faithful"] and values(df, "avg") == want
    store.update_run(run.id, state={**run.state, "uncarried": [2]})  # kept again, but not at epoch 2
    df = flor.replay("run", code=probe, epochs="1-2", store=store)
    assert df.attrs["fidelity"]["faithful"] and values(df, "avg") == want
    assert "1 with the step loop skipped" in df.attrs["fidelity"]["plan"], df.attrs["fidelity"]["plan"]
    unpicklable = AVG.replace("        total += loss.item()\n", "        total += loss.item()\n"
                              "        scale = lambda v: v\n").replace("return total /", "return scale(total) /")
    run = record(store, "lambda", AVG_TRAIN, unpicklable)
    assert run.state["uncarried"] == list(range(6))  # a function is not a plain value: every epoch runs its step loop
    df = flor.replay("lambda", code=probe, epochs="1-2", store=store)
    assert df.attrs["fidelity"]["faithful"] and values(df, "avg") == want
    assert "0 with the step loop skipped" in df.attrs["fidelity"]["plan"], df.attrs["fidelity"]["plan"]


def test_what_a_helper_carries_past_its_step_loop():
    from flor_nb.edits import helper_reads_after_steps

    src = AVG.replace("    return total / len(loader)", "    seen, hist, n = [], stats, 0\n") + '''
def fit(model, loader, opt, stats):
    seen = []
    for x, y in loader:
        opt.step()
        seen.append(x)
        stats["n"] = 1
        last = x
    return len(seen), stats, opt, model, loader, last
'''
    hint = {"name": "train", "header": "for (x, y) in loader", "nth": 0}
    assert helper_reads_after_steps(AVG, hint, AVG_TRAIN) == ["total"]  # not loader: iterated, not changed
    fit = {"name": "fit", "header": "for (x, y) in loader", "nth": 0}
    # opt and stats are the cell's objects, put back in place by the restore; seen and last are the helper's own
    assert helper_reads_after_steps(src, fit, "for e in r:\n    fit(model, loader, opt, stats)\n") == ["last", "seen"]
    assert helper_reads_after_steps(src, fit, "for e in r:\n    fit(model, loader, opt, {})\n") == \
        ["last", "seen", "stats"]  # a fresh dict each call: not restored
    assert helper_reads_after_steps(src, {**fit, "header": "for b in other"}, "") == ["?"]
    given = AVG.replace("    total = 0.0\n", "    total = 0.0\n    stats = {}\n    it = iter(loader)\n").replace(
        "        total += loss.item()\n", "        total += loss.item()\n        update(stats, loss)\n").replace(
        "    return total / len(loader)", "    return total / len(loader), stats, next(it, None)")
    # changed by a function it is given to; an iterator the loop advances
    assert helper_reads_after_steps(given, hint, AVG_TRAIN) == ["stats", "total"]
    assert helper_reads_after_steps(given.replace("in loader:", "in it:"), {**hint, "header": "for (x, y) in it"},
                                    AVG_TRAIN) == ["it", "stats", "total"]
    closure = AVG.replace("    total = 0.0\n", "    total = 0.0\n    seen = []\n\n    def add(v):\n        seen.append(v)\n\n").replace(
        "        total += loss.item()\n", "        total += loss.item()\n        add(1)\n").replace(
        "    return total / len(loader)", "    return total / len(seen)")
    assert helper_reads_after_steps(closure, hint, AVG_TRAIN) == ["seen", "total"]  # changed by add(), its own


def test_only_plain_values_are_kept():
    import torch

    from flor_nb.omission import _kept

    t = torch.ones(2, requires_grad=True)
    kept = _kept({"total": 1.5, "losses": [torch.ones(1) * 2, 3], "out": (t * 2, "s")})
    assert kept["total"] == 1.5 and kept["losses"][1] == 3 and not kept["out"][0].requires_grad
    for bad in (torch.nn.Linear(1, 1), t, [torch.nn.Parameter(torch.ones(1))], object(), {1, 2}, lambda: 0):
        with pytest.raises(ValueError):
            _kept(bad)  # a module or a parameter copied would not be the live one in a replay

