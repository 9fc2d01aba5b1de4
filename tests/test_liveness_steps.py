"""An epoch loop whose step loop clears the gradients first (``opt.zero_grad()`` at the top of the batch loop):
its checkpoints leave the gradients out, at the step loop's exit and at the epoch's end (about a quarter of an
Adam checkpoint), and the last batch's variables, and replay never restores them where the replayed code reads
them."""
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
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.StepLR(opt, 2)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=32, shuffle=True)

def evaluate(m):
    m.eval()  # the method, not the builtin eval: the helper still reads no gradient
    with torch.no_grad():
        return float((m(X).argmax(1) == Y).float().mean())
'''
TRAIN = '''
for epoch in range(6):
    model.train()
    for x, y in loader:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        flor.log("loss", loss.item())
    sched.step()
    flor.log("acc", evaluate(model))
'''
TAIL = TRAIN.replace('    flor.log("acc"', '    flor.log("w", float(model[0].weight.detach().norm()))\n    flor.log("acc"')
TAIL_GRAD = TRAIN.replace('    flor.log("acc"', '    flor.log("g", float(model[0].weight.grad.norm()))\n    flor.log("acc"')
TAIL_BATCH = TRAIN.replace('    flor.log("acc"', '    flor.log("last_x", float(x.sum()))\n    flor.log("acc"')
FIRST_GRAD = TRAIN.replace('        opt.zero_grad()\n', '        g0 = model[0].weight.grad\n'
                           '        flor.log("prev_g", 0.0 if g0 is None else float(g0.sum()))\n'
                           '        opt.zero_grad()\n')


def record(store, name, code):
    ns = {"flor": flor}
    exec(SETUP, ns)
    return flor.record(code, name=name, namespace=ns, cells=[SETUP], store=store, overhead=float("inf"))


def values(frame, name):
    rows = frame[frame[name].notna()] if name in frame else frame.iloc[0:0]
    return [(int(r["epoch"]), None if pd.isna(r["step"]) else int(r["step"]), r[name]) for _, r in rows.iterrows()]


def test_both_checkpoints_of_an_epoch_leave_out_the_gradients_its_step_loop_clears_first(store):
    run = record(store, "cnn", TRAIN)
    assert run.state["dead"] == {"names": ["loss", "x", "y"], "cleared": [["zero_grad", "opt"]], "clear_line": 5,
                                 "steps": True}
    last = run.epochs_completed - 1
    assert run.state["omitting"] and run.state["omitting_steps"]
    assert last not in run.state["omitting"] + run.state["omitting_steps"]  # the code after the loop may read them
    # every k-th checkpoint keeps everything, and the last: a probe that reads what the others left out before the
    # epoch recomputes it replays from at most k checkpoints back. k = 8 here: the gradients and the batch left
    # out are 62% of the model's and Adam's state (5,012 bytes of 8,128)
    assert run.state["whole_every"] == 8
    assert run.state["omitting_steps"] == run.state["omitting"] == [0, 1, 2, 3, 4]
    ckpts = store.checkpoints(run.id)
    k = run.state["omitting_steps"][0]
    for path in (ckpts[k]["path"], ckpts[k]["end_path"]):
        snap = checkpoint.read(store.home, path)
        assert "grad/model" not in snap["tensors"] and "val/x" not in snap["tensors"]
        assert set(snap["python"]["omitted"]) == {"grad/model", "val/loss", "val/x", "val/y"}
        assert "obj/model" in snap["tensors"] and "obj/opt" in snap["tensors"]
    assert "grad/model" in ckpts[k]["digest"] and "grad/model" in ckpts[k]["end_digest"]  # still checked
    assert {"grad/model", "val/x"} <= set(checkpoint.read(store.home, ckpts[last]["end_path"])["tensors"])


@pytest.mark.parametrize("code, name, plan_says", [
    (TAIL, "w", "with the step loop skipped"),
    (TAIL_GRAD, "g", "those epochs run their step loop"),
    (FIRST_GRAD, "prev_g", "starts from checkpoints that kept everything"),
    (TAIL_BATCH, "last_x", "may read x, which the step-exit states"),
])
def test_replay_is_exact_wherever_the_probe_reads_the_gradients(store, code, name, plan_says):
    record(store, "run", TRAIN)
    record(store, "truth", code)
    df = flor.replay("run", code=code, epochs="2-3", store=store)
    fidelity = df.attrs["fidelity"]
    assert fidelity["faithful"], df.attrs["verdict"]
    assert plan_says in fidelity["plan"], fidelity["plan"]
    truth = flor.dataframe(name, run="truth", store=store)
    got = values(df, name)
    assert got and got == [v for v in values(truth, name) if v[0] in (2, 3)]
    if code is TAIL:  # the skipped step loops computed none of it: the verdict says it was not compared
        assert ("Not compared at the end of epochs 2-3, where this replay skipped the step loop: the gradients of "
                "model, loss, x, y") in df.attrs["verdict"], df.attrs["verdict"]
        assert fidelity["not_compared"]["left_out"]["epochs"] == [2, 3]
    else:
        assert "left_out" not in fidelity["not_compared"]


def _judge(body: str, reads=None) -> liveness.Dead:
    epoch = ast.parse(body).body[0]
    step = next(n for n in ast.walk(epoch) if isinstance(n, ast.For) and n is not epoch)
    return liveness.dead_through_steps(epoch, step, lambda call: not (
        isinstance(call.func, ast.Attribute) and call.func.attr == "step" and call.func.value.id == "opt"), reads)


def test_how_often_a_checkpoint_keeps_everything_follows_what_the_others_leave_out():
    from flor_nb.omission import whole_every

    assert whole_every(3_000, 1_000) == 5  # Adam, Adadelta: the gradients are a third of their state
    assert whole_every(2_000, 1_000) == 7  # SGD with momentum: a half
    assert whole_every(2_000, 1_200) == 8  # ... with the last batch (the CIFAR10 tutorial)
    assert whole_every(1_000, 1_000) == 13  # plain SGD: as big as the state
    assert whole_every(1_000, 10) == 4 and whole_every(10, 1_000) == 16  # the bounds


def test_the_gradients_are_left_out_only_where_nothing_reads_them():
    ok = "for e in r:\n    m.train()\n    for x in d:\n        opt.zero_grad()\n        l(x).backward()\n        opt.step()\n"
    assert _judge(ok).cleared == (("zero_grad", "opt"),) and _judge(ok).steps
    assert _judge(ok + "    sched.step()\n").steps  # a scheduler's step() reads no gradient
    assert not _judge(ok + "    clip(m.weight.grad)\n")  # the code after the step loop reads them
    assert not _judge(ok + "    opt.step()\n")  # an optimizer's step does
    assert not _judge(ok.replace("    m.train()\n", "    if e < 2:\n        continue\n"))  # may not reach the steps
    assert not _judge(ok.replace("    m.train()\n", "    log(m.weight.grad)\n"))  # read before the clearing
    accumulate = "for e in r:\n    for x in d:\n        l(x).backward()\n        opt.step()\n        opt.zero_grad()\n"
    assert not _judge(accumulate)  # cleared after the read: they carry into the next epoch
    nested = "for e in r:\n    with ctx:\n        for x in d:\n            opt.zero_grad()\n"
    assert not _judge(nested)  # the step loop is not a statement of the epoch body
    batch = "for e in r:\n    for x in d:\n        out = m(x)\n        opt.zero_grad()\n        l(out).backward()\n"
    assert _judge(batch, set()).names == {"x", "out"}
    assert _judge(batch + "    log(out)\n", set()).names == {"x"}  # read after the step loop: kept
    assert _judge(batch, {"out"}).names == {"x"}  # a function of the cells reads it: kept
    assert _judge(batch.replace("        out = m(x)\n", "        if x is None:\n            continue\n"
                                "        out = m(x)\n"), set()).names == {"x"}  # may be skipped


def test_a_probe_calling_a_helper_that_reads_gradients_needs_them():
    dead = liveness.Dead((), (("zero_grad", "opt"),), 5, steps=True)
    assert liveness.for_replay(dead, TAIL, TRAIN, {}, [SETUP]) == (set(), False, ())
    helper = "def grad_norm(m):\n    return sum(float(p.grad.norm()) for p in m.parameters())\n"
    wrapper = "def stats(m):\n    return grad_norm(m)\n"
    probe = TRAIN.replace('    flor.log("acc"', '    flor.log("s", stats(model))\n    flor.log("acc"')
    assert liveness.for_replay(dead, probe, TRAIN, {}, [SETUP, helper, wrapper]) == (set(), False, ("the gradients",))
    assert liveness.for_replay(dead, probe, TRAIN, {}, [SETUP, "def stats(m):\n    return 1.0\n"]).tail == ()


@pytest.mark.parametrize("probe, reads", [
    ("sched.get_last_lr()[0]", False),
    ("torch.nn.functional.cross_entropy(model(X), Y).item()", False),  # a library function, a module's forward
    ("model.custom_summary()", True),  # a method it cannot judge
    ("float(model[0].weight.grad.norm())", True),
    ("diag.gn(model)", True),  # a module file of the user's that reads them
    ("gn(model)", True),
    ("weights.wn(model)", False),  # one that does not
    ("torchlib.get_grad_norm(model)", True),  # a library function whose name says it reads them
    ("extdiag.gn(model)", True),  # the user's module in another folder on sys.path
])
def test_probes_calling_code_outside_the_cells_are_judged_where_it_can_be_read(tmp_path, monkeypatch, probe, reads):
    (tmp_path / "diag.py").write_text("def gn(m):\n    return float(m[0].weight.grad.norm())\n")
    (tmp_path / "weights.py").write_text("def wn(m):\n    return float(m[0].weight.detach().norm())\n")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "extdiag.py").write_text("def gn(m):\n    return float(m[0].weight.grad.norm())\n")
    (tmp_path / "nb").mkdir()
    monkeypatch.chdir(tmp_path / "nb")  # the modules lie outside the notebook's folder, on sys.path
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    dead = liveness.Dead((), (("zero_grad", "opt"),), 5, steps=True)
    imports = "import diag, weights, extdiag\nfrom diag import gn\nimport torch as torchlib\n"
    code = TRAIN.replace('    flor.log("acc"', f'    flor.log("p", {probe})\n    flor.log("acc"')
    assert liveness.for_replay(dead, code, TRAIN, {}, [SETUP, imports]).tail == (("the gradients",) if reads else ())


def _installed(tmp_path, monkeypatch):
    """A package installed in a site-packages folder (trusted unread, as installed code is) whose function reads
    the gradients behind a None guard, under a name that does not say so."""
    site = tmp_path / "venv" / "lib" / "site-packages"
    (site / "normstats").mkdir(parents=True)
    (site / "normstats" / "__init__.py").write_text(
        "def total(m):\n    return sum(float(p.grad.norm()) for p in m.parameters() if p.grad is not None)\n\n"
        "def scale(x):\n    return 2.0 * x\n")
    monkeypatch.syspath_prepend(str(site))
    return f"import sys\nsys.path.insert(0, {str(site)!r})\nimport normstats\n"  # a cell: replay workers run it


@pytest.mark.parametrize("probe, reads", [
    ("normstats.total(model)", True),  # given the model: it may read them
    ("normstats.scale(float(model[0].weight.detach().norm()))", True),  # given a tensor of the model's, likewise
    ("normstats.scale(3.0)", False),  # given nothing that holds them
    ("torch.linalg.vector_norm(model[0].weight).item()", False),  # torch's functions read none
    ("operator.attrgetter('grad')(model[0].weight).sum().item()", True),
])
def test_an_installed_library_given_the_model_may_read_its_gradients(tmp_path, monkeypatch, probe, reads):
    _installed(tmp_path, monkeypatch)
    dead = liveness.Dead((), (("zero_grad", "opt"),), 5, steps=True)
    imports = "import normstats, operator\n"
    code = TRAIN.replace('    flor.log("acc"', f'    flor.log("p", {probe})\n    flor.log("acc"')
    need = liveness.for_replay(dead, code, TRAIN, {}, [SETUP, imports], holders={"model", "opt"})
    assert need.tail == (("the gradients",) if reads else ())


def test_a_replay_runs_the_step_loop_for_a_library_that_reads_the_gradients_unseen(store, tmp_path, monkeypatch):
    """Before, the library was trusted: the skipped step loops left no gradients, and it summed none (0.0), under
    a faithful verdict."""
    cell = _installed(tmp_path, monkeypatch)
    code = TRAIN.replace('    flor.log("acc"', '    flor.log("gn", normstats.total(model))\n    flor.log("acc"')
    for name, cell_code in (("run", TRAIN), ("truth", code)):
        ns = {"flor": flor}
        exec(SETUP, ns)
        exec(cell, ns)
        flor.record(cell_code, name=name, namespace=ns, cells=[SETUP, cell], store=store, overhead=float("inf"))
    df = flor.replay("run", code=code, epochs="1-2", store=store)
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]
    assert "those epochs run their step loop" in df.attrs["fidelity"]["plan"]
    got = values(df, "gn")
    assert got and got == [v for v in values(flor.dataframe("gn", run="truth", store=store), "gn") if v[0] in (1, 2)]
    assert all(v[2] > 0 for v in got)


def test_a_library_given_the_model_after_the_step_loop_keeps_the_gradients_at_record():
    import copy

    import torch

    from flor_nb.grad_reads import record_judge

    model = torch.nn.Linear(2, 2)
    ns = {"copy": copy, "torch": torch, "model": model, "opt": torch.optim.SGD(model.parameters(), lr=0.1),
          "__name__": "__main__"}
    judge = record_judge(ns)
    call = ast.parse("copy.deepcopy(model)").body[0].value  # copies the gradients too
    assert not judge(call)
    assert judge(ast.parse("torch.save(model.state_dict(), 'm.pt')").body[0].value)
    assert judge(ast.parse("copy.deepcopy(3)").body[0].value)
    assert judge(ast.parse("print(model)").body[0].value)


def test_the_record_judge_follows_classes_that_name_themselves_and_trusts_str_methods():
    """``super(VAE, self).__init__()`` (pytorch/examples' VAE, MNIST) made the judge follow the class into itself
    until its depth ran out, so any helper using the model counted as reading gradients; ``'{}'.format(x)`` had no
    name to judge."""
    import torch

    from flor_nb.grad_reads import record_judge

    ns = {"torch": torch, "__name__": "__main__"}
    exec("class Net(torch.nn.Module):\n    def __init__(self):\n        super(Net, self).__init__()\n"
         "        self.fc = torch.nn.Linear(2, 2)\n\n    def forward(self, x):\n        return self.fc(x)\n\n"
         "model = Net()\n\ndef test():\n    return model(torch.ones(2)).sum()\n\n"
         "def peek():\n    return float(model.fc.weight.grad.sum())\n", ns)
    judge = record_judge(ns)
    assert judge(ast.parse("test()").body[0].value) and judge(ast.parse("model(1)").body[0].value)
    assert not judge(ast.parse("peek()").body[0].value)
    assert judge(ast.parse("'{:.4f}'.format(1.0)").body[0].value)
