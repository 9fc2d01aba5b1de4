"""The step loop inside a helper the epoch loop calls (pytorch/examples' MNIST: ``train(args, model, device,
train_loader, optimizer, epoch)`` clears the gradients at the top of its batch loop): both checkpoints of an
epoch leave the gradients out, and replay never restores them where the replayed code, in the cell or in the
helper, reads them."""
from __future__ import annotations

import ast

import pandas as pd
import pytest

import flor_nb as flor
from flor_nb import checkpoint, liveness

SETUP = '''
import torch
torch.manual_seed(0)
X, Y = torch.randn(192, 16), torch.randint(0, 4, (192,))
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
sched = torch.optim.lr_scheduler.StepLR(optimizer, 2)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=32, shuffle=True)
'''
HELPERS = '''
def train(model, loader, opt, epoch):
    model.train()
    for x, y in loader:
        x = x.to("cpu")
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()


def test(model):
    model.eval()
    with torch.no_grad():
        return float((model(X).argmax(1) == Y).float().mean())
'''
TRAIN = '''
for epoch in range(6):
    train(model, loader, optimizer, epoch)
    sched.step()
    flor.log("acc", test(model))
'''
TAIL = TRAIN.replace('    flor.log("acc"', '    flor.log("w", float(model[0].weight.detach().norm()))\n    flor.log("acc"')
TAIL_GRAD = TRAIN.replace('    flor.log("acc"', '    flor.log("g", float(model[0].weight.grad.norm()))\n    flor.log("acc"')
IN_HELPER_GRAD = HELPERS.replace('        opt.step()\n', '        opt.step()\n'
                                 '    flor.log("hg", float(model[2].weight.grad.norm()))\n')
FIRST_GRAD = HELPERS.replace('    model.train()\n', '    model.train()\n    g0 = model[2].weight.grad\n'
                             '    flor.log("prev_g", 0.0 if g0 is None else float(g0.sum()))\n')


def record(store, name, code, helpers=HELPERS):
    ns = {"flor": flor}
    exec(SETUP, ns)
    exec(helpers, ns)
    return flor.record(code, name=name, namespace=ns, cells=[SETUP, helpers], store=store, overhead=float("inf"))


def values(frame, name):
    rows = frame[frame[name].notna()] if name in frame else frame.iloc[0:0]
    return [(int(r["epoch"]), None if pd.isna(r["step"]) else int(r["step"]), r[name]) for _, r in rows.iterrows()]


def test_the_checkpoints_leave_out_the_gradients_a_helper_clears_first(store):
    run = record(store, "mnist", TRAIN)
    assert run.state["loops"]["helper"]["name"] == "train"
    # the cell's `optimizer`, passed for the helper's `opt`; the helper's locals (x, loss) are not the cell's
    assert run.state["dead"] == {"names": [], "cleared": [["zero_grad", "optimizer"]], "clear_line": 6,
                                 "steps": True}
    assert run.state["whole_every"] == 5  # the gradients are a third of the model's and Adadelta's state
    assert run.state["omitting_steps"] == run.state["omitting"] == [0, 1, 2, 3]
    ckpts = store.checkpoints(run.id)
    for path in (ckpts[1]["path"], ckpts[1]["end_path"]):
        snap = checkpoint.read(store.home, path)
        assert "grad/model" not in snap["tensors"] and set(snap["python"]["omitted"]) == {"grad/model"}
        assert "obj/model" in snap["tensors"] and "obj/optimizer" in snap["tensors"]
    assert "grad/model" in ckpts[1]["digest"] and "grad/model" in ckpts[1]["end_digest"]  # still checked
    assert "grad/model" in checkpoint.read(store.home, ckpts[5]["end_path"])["tensors"]  # the last keeps them


@pytest.mark.parametrize("code, helpers, name, plan_says", [
    (TAIL, HELPERS, "w", "with the step loop skipped"),
    (TAIL_GRAD, HELPERS, "g", "those epochs run their step loop"),
    (TRAIN, IN_HELPER_GRAD, "hg", "6 epoch(s) in full"),
    (TRAIN, FIRST_GRAD, "prev_g", "starts from checkpoints that kept everything"),
])
def test_replay_is_exact_wherever_the_probe_reads_the_gradients(store, code, helpers, name, plan_says):
    record(store, "run", TRAIN)
    record(store, "truth", code, helpers)
    df = flor.replay("run", code=code, epochs="1-2", store=store, cells=None if helpers is HELPERS else {2: helpers})
    fidelity = df.attrs["fidelity"]
    assert fidelity["faithful"], df.attrs["verdict"]
    truth = flor.dataframe(name, run="truth", store=store)
    got = values(df, name)
    assert got and got == [v for v in values(truth, name) if v[0] in (1, 2)]
    if helpers is HELPERS:
        assert plan_says in fidelity["plan"], fidelity["plan"]
    elif name == "hg":  # a probe after the helper's step loop: from the checkpoint just before, gradients or not
        assert "kept everything" not in fidelity["plan"], fidelity["plan"]
    else:
        assert plan_says in fidelity["plan"], fidelity["plan"]


def _no_step(call) -> bool:  # what the recorder's judge says of an optimizer's step(): it reads the gradients
    return not (isinstance(call.func, ast.Attribute) and call.func.attr == "step"
                and getattr(call.func.value, "id", "") in ("opt", "optimizer"))


def _dead(cell: str, helpers: str, judge=_no_step) -> liveness.Dead:
    choice = {"helper": {"name": "train", "header": "for (x, y) in loader", "nth": 0}}
    epoch = ast.parse(cell).body[0]
    found = liveness.find_helper(epoch, choice, [helpers])
    if found is None:
        return liveness.Dead()
    h, step = found
    return liveness.dead_through_steps(epoch, step, liveness.helper_judge(h, judge, judge, judge), set(), h)


def test_a_helper_leaves_the_gradients_out_only_where_nothing_reads_them():
    assert _dead(TRAIN, HELPERS).cleared == (("zero_grad", "optimizer"),)
    assert not _dead(TRAIN + "    print(model[0].weight.grad)\n", HELPERS)  # the epoch's tail reads them
    assert not _dead(TRAIN, HELPERS.replace("        opt.step()\n", "        opt.step()\n    clip(model)\n"),
                     lambda call: _no_step(call) and not (isinstance(call.func, ast.Name) and call.func.id == "clip"))
    assert not _dead(TRAIN, HELPERS.replace("    model.train()\n", "    if epoch < 1:\n        return 0.0\n"))
    assert not _dead(TRAIN.replace("    train(", "    last = 0 if epoch < 1 else train("), HELPERS)  # not a call stmt
    assert not _dead(TRAIN.replace("loader, optimizer", "loader, *[optimizer]"), HELPERS)
    assert not _dead(TRAIN + "    train(model, loader, optimizer, epoch)\n", HELPERS)  # called twice
    assert not _dead(TRAIN, HELPERS.replace("        opt.zero_grad()\n", "").replace(
        "        opt.step()\n", "        opt.step()\n        opt.zero_grad()\n"))  # cleared after the read
    # a local optimizer has no variable of the cell to leave out; a global one clears under its own name
    assert not _dead(TRAIN, HELPERS.replace("    model.train()\n", "    model.train()\n    o = opt\n")
                     .replace("opt.zero_grad()", "o.zero_grad()"))
    assert _dead(TRAIN, HELPERS.replace("opt.zero_grad()", "optimizer.zero_grad()")).cleared == \
        (("zero_grad", "optimizer"),)
    assert _dead(TRAIN.replace("(model, loader, optimizer, epoch)", "(model, loader, opt=optimizer, epoch=epoch)"),
                 HELPERS).cleared == (("zero_grad", "optimizer"),)



def test_a_probe_in_the_helper_that_draws_random_numbers_leaves_training_as_recorded(store):
    """The loader shuffles with torch's global generator: a draw in the helper's step loop moved the next epoch's
    order, and the replay said a probe changed training. Statements inserted into an edited cell's functions
    have their draws undone (probe_rng), so the values are those of a run that had the probe from the start,
    its draws undone there by hand with torch.random.fork_rng()."""
    noise = '        flor.log("noise", float(torch.rand(1)))\n'
    noisy = HELPERS.replace('        opt.step()\n', '        opt.step()\n' + noise)
    truth = HELPERS.replace('        opt.step()\n', '        opt.step()\n        with torch.random.fork_rng():\n    ' + noise)
    record(store, "run", TRAIN)
    record(store, "truth", TRAIN, truth)
    df = flor.replay("run", code=TRAIN, epochs="1-2", store=store, cells={2: noisy})
    assert df.attrs["fidelity"]["level"] == "faithful", df.attrs["verdict"]
    want = [v for v in values(flor.dataframe("noise", run="truth", store=store), "noise") if v[0] in (1, 2)]
    assert len(want) == 12 and values(df, "noise") == want
