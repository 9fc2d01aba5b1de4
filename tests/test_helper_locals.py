"""A helper whose code after its step loop reads what the loop set (``total += loss.item()`` in the loop,
``return total / len(loader)`` after it): a replay that skipped the step loop would run that code on the values
from before the loop, so such a helper's step loop always runs, and the plan says why."""
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
def test_a_helper_whose_code_after_the_step_loop_reads_what_the_loop_set_runs_its_step_loop(store, recorded, probe):
    """Skipping the step loop would leave ``total`` at 0.0 and log an average of 0.0."""
    record(store, "run", recorded, AVG)
    record(store, "truth", probe, AVG)
    df = flor.replay("run", code=probe, epochs="1-2", store=store)
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]
    assert "train() reads total after its step loop, which sets it" in df.attrs["fidelity"]["plan"]
    assert values(df, "avg") == [v for v in values(flor.dataframe("avg", run="truth", store=store), "avg")
                                 if v[0] in (1, 2)]


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
