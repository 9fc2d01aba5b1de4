"""Capture by reachability: state real training carries is restored, verified, or named as not captured.

Each test records a real training cell, replays it in worker processes, and compares the probes
with a run that had them from the start (same seeds), or checks the verdict names the cause.
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch

import flor_nb as flor
from flor_nb import checkpoint, hashing
from flor_nb.errors import FlorError, NotCapturedWarning

from conftest import uncompress_checkpoint

SETUP = '''
import random
import numpy as np
import torch, torch.nn as nn, torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0); np.random.seed(0); random.seed(0)
X = torch.randn(256, 10); y = (X[:, 0] - X[:, 2] > 0).long()
loader = DataLoader(TensorDataset(X, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))
model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
lr_table = np.linspace(0.1, 0.01, 20)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_table.__getitem__)

class EMA:
    def __init__(self, model, decay=0.9):
        self.decay, self.updates = decay, 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
    def update(self, model):
        self.updates += 1
        with torch.no_grad():
            for k, v in model.state_dict().items():
                self.shadow[k].mul_(self.decay).add_(v, alpha=1 - self.decay)

class EarlyStopping:
    def __init__(self, patience=3):
        self.patience, self.best, self.bad = patience, float("inf"), 0
    def step(self, value):
        if value < self.best - 1e-4:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        return self.bad > self.patience

ema = EMA(model)
stopper = EarlyStopping()
rng = np.random.default_rng(7)
hist = []
log = {"hist": hist, "noise": []}
seen = []
'''

# The cell only *reads* ema, stopper, rng, log and seen: they change through methods and mutation.
TRAIN = '''
for epoch in range(EPOCHS):
    model.train()
    for xb, yb in loader:
        xb = xb + torch.from_numpy(rng.normal(0, 0.01, xb.shape)).float()
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(); loss.backward(); opt.step()
        ema.update(model)
        seen.extend([loss.item()] * 500)
        flor.log("loss", loss.item())
    sched.step()
    model.eval()
    with torch.no_grad():
        val = F.cross_entropy(model(X), y).item()
    hist.append(val)
    log["noise"].append(float(np.random.rand()))
    flor.log("val", val)
    if stopper.step(val):
        break
'''

PROBES = '''    flor.log("ema_updates", ema.updates)
    flor.log("ema_norm", float(sum(v.float().norm() for v in ema.shadow.values())))
    flor.log("stop_best", stopper.best)
    flor.log("stop_bad", stopper.bad)
    flor.log("shared", log["hist"] is hist)
    flor.log("hist_len", len(log["hist"]))
    flor.log("seen_len", len(seen))
    flor.log("noise_sum", sum(log["noise"]))
    flor.log("rng_state", int(rng.bit_generator.state["state"]["state"] % 1000003))
    flor.log("lr", opt.param_groups[0]["lr"])
'''
NAMES = ["ema_updates", "ema_norm", "stop_best", "stop_bad", "shared", "hist_len", "seen_len", "noise_sum",
         "rng_state", "lr"]
PROBED = TRAIN.replace("    sched.step()\n", PROBES + "    sched.step()\n")


def namespace(setup=SETUP, epochs=6):
    ns = {"flor": flor, "EPOCHS": epochs, "__name__": "__main__"}
    exec(setup, ns)
    return ns


def record(store, code=TRAIN, name="t", setup=SETUP, epochs=6, **kw):
    return flor.record(code, name=name, namespace=namespace(setup, epochs), cells=[f"EPOCHS = {epochs}\n{setup}"],
                       store=store, overhead=float("inf"), **kw)


def epoch_values(frame, names, epochs):
    rows = frame[frame["step"].isna() & frame["epoch"].isin(epochs)]
    return {(int(r["epoch"]), n): r[n] for _, r in rows.iterrows() for n in names}


@pytest.fixture
def recorded(store):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotCapturedWarning)  # everything here can be captured
        return record(store)


@pytest.fixture
def truth(store):
    run = record(store, code=PROBED, name="truth")
    return flor.dataframe(*NAMES, run=run.label, store=store)


def test_read_only_helpers_shared_refs_and_big_lists_replay_exactly(recorded, truth, store):
    """EMA, early stopping, a numpy Generator, a list past 10,000 items, shared containers, a LambdaLR
    over a numpy table: values in epochs 3-5 equal a run that had the probes from the start."""
    df = flor.replay("t", code=PROBED, epochs="3-5", store=store)
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]
    got, want = epoch_values(df, NAMES, {3, 4, 5}), epoch_values(truth, NAMES, {3, 4, 5})
    assert len(want) == 30 and got == want
    assert want[(5, "seen_len")] == 6 * 8 * 500  # grew well past 10,000 items
    assert all(want[(e, "shared")] for e in (3, 4, 5))  # log["hist"] is hist after restore


def test_state_dict_that_raises_is_captured_by_attributes(recorded, store):
    """LambdaLR(opt, lr_table.__getitem__).state_dict() raises inside torch; the cell still records."""
    assert recorded.status == "finished" and recorded.epochs_completed == 6
    assert "state_dict() raised AttributeError" in recorded.state["notes"]["sched"]
    assert recorded.state["not_captured"] == {}


def test_numpy_scalars_in_param_groups_load(store):
    setup = SETUP.replace("sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_table.__getitem__)", "sched = None")
    code = TRAIN.replace("    sched.step()\n", "    for g in opt.param_groups:\n        g['lr'] = lr_table[epoch]\n")
    record(store, code=code, setup=setup, name="np_lr")
    probed = code.replace("    model.eval()\n", "    model.eval()\n    flor.log('lr', opt.param_groups[0]['lr'])\n")
    df = flor.replay("np_lr", code=probed, epochs="2-3", store=store)
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]
    lrs = df[df.step.isna()]["lr"].tolist()
    assert lrs == [pytest.approx(float(v)) for v in (list(__import__("numpy").linspace(0.1, 0.01, 20))[2:4])]
    assert all(type(v) is float for v in lrs)


def test_requires_grad_and_added_param_groups_are_restored(store):
    setup = SETUP.replace("sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_table.__getitem__)", "") + \
        "head = nn.Linear(2, 2)\n"
    code = TRAIN.replace("    sched.step()\n", (
        "    if epoch == 1:\n"
        "        model[0].weight.requires_grad_(False)\n"
        "        opt.add_param_group({'params': head.parameters(), 'lr': 0.05})\n"))
    record(store, code=code, setup=setup, name="frozen")
    probed = code.replace("    model.eval()\n", (
        "    model.eval()\n"
        "    flor.log('frozen', not model[0].weight.requires_grad)\n"
        "    flor.log('groups', len(opt.param_groups))\n"
        "    flor.log('w', float(model[0].weight.sum()))\n"))
    truth = record(store, code=probed, setup=setup, name="frozen_truth")
    df = flor.replay("frozen", code=probed, epochs="3-4", store=store)
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]
    want = flor.dataframe("frozen", "groups", "w", run=truth.label, store=store)
    assert epoch_values(df, ["frozen", "groups", "w"], {3, 4}) == epoch_values(want, ["frozen", "groups", "w"], {3, 4})
    assert epoch_values(df, ["groups"], {3})[(3, "groups")] == 2


@pytest.mark.parametrize("probe", ["float(np.random.rand())", "random.random()", "float(torch.rand(1))"])
def test_probe_drawing_from_a_global_generator_is_undone(recorded, store, probe):
    """A probe line of its own drawing from numpy's, Python's or torch's global generator: its draws are put back
    after it (probe_rng), so training stays the recorded one."""
    code = TRAIN.replace("    model.eval()\n", f"    model.eval()\n    flor.log('draw', {probe})\n")
    df = flor.replay("t", code=code, epochs="2-3", store=store)
    assert df.attrs["fidelity"]["level"] == "faithful", df.attrs["verdict"]
    assert df["draw"].notna().sum() == 2


@pytest.mark.parametrize("probe", [
    "torch.manual_seed(123)\n    flor.log('a', float(torch.rand(1)))\n",  # a seed, then a draw: one block
    "np.random.seed(5); flor.log('a', float(np.random.rand()))\n",
    "flor.log('a', float(torch.rand(1)))\n    flor.log('b', float(torch.rand(1)))\n",  # two draws, not the same one
])
def test_probe_statements_in_a_row_draw_as_one_block(store, probe):
    """The statements a replay inserts in a row are guarded as one block: what they draw is what a run that had them
    drew, with the block's draws undone there by hand (fork_rng, numpy's and Python's state put back)."""
    at = "    model.eval()\n"
    record(store)
    undo = ("    _s = (np.random.get_state(), random.getstate())\n    with torch.random.fork_rng():\n"
            + "".join("    " + ln + "\n" for ln in ("    " + probe).splitlines())
            + "    np.random.set_state(_s[0]); random.setstate(_s[1])\n")
    truth = record(store, code=TRAIN.replace(at, at + undo), name="truth")
    df = flor.replay("t", code=TRAIN.replace(at, at + "    " + probe), epochs="2-3", store=store)
    assert df.attrs["fidelity"]["level"] == "faithful", df.attrs["verdict"]
    names = [n for n in ("a", "b") if n in df]
    want = flor.dataframe(*names, run=truth.label, store=store)
    assert epoch_values(df, names, {2, 3}) == epoch_values(want, names, {2, 3})
    if "b" in names:
        assert epoch_values(df, ["a"], {2}) != {(2, "a"): df[df.epoch == 2]["b"].dropna().iloc[0]}


@pytest.mark.parametrize("change, how", [
    ("    buf.x.extend(range(16))\n", "its length went from 64 to 80"),  # a growing buffer
    ("    labels[:4] = 1 - labels[:4]\n", "a tensor it holds was changed in place"),  # relabelled in place
    # pseudo-labels written into a list of targets, as CIFAR10 keeps them (items were not seen)
    ("    buf.targets[epoch] = 1 - buf.targets[epoch]\n", "items of a list or array it holds were replaced in place"),
    ("    buf.feats[epoch] *= -1\n", "items of a list or array it holds were replaced in place"),  # a numpy array
])
def test_a_dataset_training_changes_is_named_when_it_changes_and_by_a_replay_that_reads_it(store, change, how):
    """DataLoaders and Datasets are rebuilt by their cells in a replay, never restored: one that training changed
    would be read unchanged by a replayed later epoch. Record names it at the end of the epoch that changed it, and a
    replay whose code reads it says so (its verdict was a plain "Faithful")."""
    setup = SETUP + ("class Buf(torch.utils.data.Dataset):\n    def __init__(self):\n        self.x = list(range(64))\n"
                     "        self.targets = [i % 2 for i in range(64)]\n        self.feats = np.ones((64, 3))\n"
                     "    def __len__(self):\n        return len(self.x)\n    def __getitem__(self, i):\n"
                     "        return self.x[i]\nbuf = Buf()\nlabels = torch.zeros(64)\n"
                     "held = TensorDataset(torch.ones(64, 2), labels)\n")
    code = TRAIN.replace("    model.eval()\n", "    model.eval()\n" + change)
    name = "buf" if "buf" in change else "held"
    code = code.replace("    hist.append(val)\n", f"    hist.append(val + 0 * len({name}))\n")
    with pytest.warns(NotCapturedWarning, match=rf"{name}: \w+ changed by training \({how} by the end of epoch 0\)"):
        record(store, code=code, setup=setup, name="grow")
    probe = code.replace("    flor.log(\"val\", val)\n", f"    flor.log(\"val\", val)\n    flor.log('n', float(len({name})))\n")
    df = flor.replay("grow", code=probe, epochs="2", store=store)
    assert df.attrs["fidelity"]["level"] == "caveats" and name in df.attrs["fidelity"]["not_captured_read"], \
        df.attrs["verdict"]


CLOSURES = """
import torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
X = torch.randn(96, 6); y = (X[:, 0] > 0).long()
model = nn.Linear(6, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
def make_warmup(opt, steps):  # a closure counter: a replay cannot put n back
    n = 0
    def step():
        nonlocal n
        n += 1
        for g in opt.param_groups:
            g["lr"] = 0.1 * min(1.0, n / steps)
    return step
def make_loss(weight, params):  # a closure over what training changes but the state holds: nothing to say
    def loss_fn(a, b):
        return F.cross_entropy(a, b) * weight + 0 * sum(p.sum() for p in params)
    return loss_fn
warmup, loss_fn = make_warmup(opt, 10), make_loss(2.0, list(model.parameters()))
"""
CLOSURE_TRAIN = """
for epoch in range(EPOCHS):
    for i in range(0, 96, 32):
        warmup()
        loss = loss_fn(model(X[i:i + 32]), y[i:i + 32])
        opt.zero_grad(); loss.backward(); opt.step()
        flor.log("loss", loss.item())
"""


def test_a_function_whose_closure_training_changes_is_named_as_not_captured(store):
    """A warmup counter behind ``nonlocal n``: functions are rebuilt by their cells, so a replay started it at 0
    and diverged, and the verdict blamed the probe. The recording now names it when training first changes it,
    and the verdict names it as what the replayed code read but could not be captured."""
    with pytest.warns(NotCapturedWarning, match=r"function warmup\(\) changed by training: its closure variable n "
                                                r"\(by the end of epoch 0\)") as told:
        run = record(store, code=CLOSURE_TRAIN, setup=CLOSURES, name="closure", epochs=4)
    assert set(run.state["not_captured"]) == {"warmup"}, run.state["not_captured"]  # not loss_fn
    assert not [w for w in told if "loss_fn" in str(w.message)]
    probe = CLOSURE_TRAIN + "        flor.log('lr', opt.param_groups[0]['lr'])\n"  # in the step loop: it runs
    df = flor.replay("closure", code=probe, epochs="2", store=store)
    assert not df.attrs["fidelity"]["faithful"] and "warmup" in df.attrs["fidelity"]["not_captured_read"]
    assert "the replayed code reads warmup, which could not be captured" in df.attrs["verdict"], df.attrs["verdict"]


def test_a_probe_keeping_a_running_value_across_epochs_is_built_from_the_first_epoch(store):
    """``vals = []`` before the loop, ``vals.append(val)`` in it: a running mean no checkpoint holds. A replay of
    epochs 3-4 started from their checkpoints averaged those two alone under "Faithful"; it now runs the epochs
    before them too (step loops skipped), in one worker, and says why."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # recorded with one thread, the replay may use two workers on two cores
    try:
        record(store)
    finally:
        torch.set_num_threads(threads)
    probe = TRAIN.replace("for epoch in range(EPOCHS):\n", "vals = []\nfor epoch in range(EPOCHS):\n").replace(
        "    flor.log(\"val\", val)\n", "    flor.log(\"val\", val)\n    vals.append(val)\n"
                                    "    flor.log(\"mean_val\", sum(vals) / len(vals))\n")
    truth = record(store, code=probe, name="truth")
    want = flor.dataframe("mean_val", run=truth.label, store=store)
    # Two workers would split the epochs where a checkpoint allows, and the second would start vals empty.
    for epochs in ("3-4", "0-5"):
        df = flor.replay("t", code=probe, epochs=epochs, workers=2, store=store)
        assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]
        assert "The probes keep vals from one epoch to the next" in df.attrs["fidelity"]["plan"]
        assert "in one worker" in df.attrs["fidelity"]["plan"], df.attrs["fidelity"]["plan"]
        assert epoch_values(df, ["mean_val"], {3, 4}) == epoch_values(want, ["mean_val"], {3, 4})


def test_a_probe_reading_its_own_value_from_the_epoch_before_is_built_from_the_first_epoch(store):
    """``flor.log("delta", val - prev)`` ... ``prev = val``, all inside the loop: a replay of epochs 3-4 raised a
    NameError (or, had the cells bound a ``prev``, used theirs). Such names are carried like a running value."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        record(store)
    finally:
        torch.set_num_threads(threads)
    probe = TRAIN.replace("    flor.log(\"val\", val)\n", "    flor.log(\"val\", val)\n    if epoch > 0:\n"
                          "        flor.log(\"delta\", val - prev)\n    prev = val\n")
    truth = record(store, code=probe, name="truth")
    want = flor.dataframe("delta", run=truth.label, store=store)
    df = flor.replay("t", code=probe, epochs="3-4", workers=2, store=store)
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]
    assert "The probes keep prev from one epoch to the next" in df.attrs["fidelity"]["plan"], df.attrs["fidelity"]["plan"]
    assert epoch_values(df, ["delta"], {3, 4}) == epoch_values(want, ["delta"], {3, 4})


@pytest.mark.parametrize("hook", [
    # logs from inside the forward pass, registered before the loop
    "model[1].register_forward_hook(lambda m, i, o: (flor.log('act', float(o.detach().mean())), None)[1])\n",
    # keeps the activations in a list the loop reads: a value carried across epochs
    "acts = []\nmodel[1].register_forward_hook(lambda m, i, o: acts.append(float(o.detach().mean())))\n",
])
def test_a_forward_hook_registered_before_the_loop_logs_what_a_run_with_it_logged(store, hook):
    """A lambda among the added lines crashed every replay of later epochs ('Call' object is not iterable: a
    lambda's body is one expression, not a list of statements) where a hook is the usual way to see activations."""
    record(store)
    probe = hook + (TRAIN if "acts" not in hook else TRAIN.replace(
        "    sched.step()\n", "    flor.log('act', sum(acts) / len(acts)); acts.clear()\n    sched.step()\n"))
    truth = record(store, code=probe, name="truth")
    want = flor.dataframe("act", run=truth.label, store=store).dropna(subset=["act"])
    df = flor.replay("t", code=probe, epochs="3", store=store)
    assert df.attrs["fidelity"]["level"] == "faithful", df.attrs["verdict"]
    got = df.dropna(subset=["act"])
    assert got[got.epoch == 3]["act"].tolist() == want[want.epoch == 3]["act"].tolist()
    assert len(want[want.epoch == 3]) == (9 if "acts" not in hook else 1)


def test_only_inserted_statements_are_guarded_even_when_a_probe_copies_the_loops_lines():
    """A diff from the top aligns a probe that copies the step loop's header and loss line with the recorded loop,
    and takes the loop's own lines for inserted ones: guarding them would undo training's draws. The guard checks
    that the cell without what it guards is the recorded one, and tries the diff from the bottom."""
    import ast

    from flor_nb import probe_rng

    recorded = ("for epoch in range(5):\n    model.train()\n    for xb, yb in loader:\n"
                "        loss = F.cross_entropy(model(xb), yb)\n        opt.zero_grad(); loss.backward(); opt.step()\n"
                "    flor.log('loss', loss.item())\n")
    probe = "    for xb, yb in loader:\n        loss = F.cross_entropy(model(xb), yb)\n        break\n" \
            "    flor.log('pre', loss.item())\n"
    edited = recorded.replace("    model.train()\n", "    model.train()\n" + probe)
    assert probe_rng.guard(ast.parse(edited), recorded, edited) == [3, 4, 5, 6]  # the copy, not the loop
    changed = edited.replace("opt.step()", "opt.step(); flor.log('x', 1)")  # a recorded line changed: no guard
    assert probe_rng.guard(ast.parse(changed), recorded, changed) == []


@pytest.mark.parametrize("probe, stream, words", [
    ("float(rng.normal())", "npgen/rng", "numpy Generator rng differs after epoch 2"),
    ("float(torch.rand(1, generator=loader.generator))", "obj/loader.generator",
     "torch.Generator loader.generator differs after epoch 2"),
])
def test_probe_drawing_from_a_generator_of_the_cells_is_flagged(recorded, store, probe, stream, words):
    code = TRAIN.replace("    model.eval()\n", f"    model.eval()\n    flor.log('draw', {probe})\n")
    df = flor.replay("t", code=code, epochs="2-3", store=store)
    fid = df.attrs["fidelity"]
    assert not fid["faithful"] and fid["level"] == "not faithful"
    assert stream in fid["state_diverged"][2]
    assert df.attrs["verdict"].startswith(f"Replay NOT faithful: {words}")
    assert "A probe changed training (make probes read-only" in df.attrs["verdict"]


def test_probe_switching_eval_mode_is_flagged(recorded, store):
    code = TRAIN.replace("        flor.log(\"loss\", loss.item())\n",
                         "        flor.log(\"loss\", loss.item())\n        model.eval()\n")
    df = flor.replay("t", code=code, epochs="1", store=store)
    assert not df.attrs["fidelity"]["faithful"]
    assert "train/model" in df.attrs["fidelity"]["state_diverged"][1]


def test_verdict_without_recorded_metrics_says_what_it_checked(store):
    code = TRAIN.replace('        flor.log("loss", loss.item())\n', "").replace('    flor.log("val", val)\n', "")
    record(store, code=code, name="quiet")
    probed = code.replace("    model.eval()\n", "    model.eval()\n    flor.log('w', float(model[0].weight.sum()))\n")
    df = flor.replay("quiet", code=probed, epochs="3-4", store=store)
    v = df.attrs["verdict"]
    assert df.attrs["fidelity"]["faithful"]
    assert v.startswith("Faithful replay: no recorded metric in epochs 3-4; training state identical")
    assert df.attrs["fidelity"]["state"]["epochs"] == [3, 4] and df.attrs["fidelity"]["state"]["streams"] > 10


def test_removed_metric_is_not_compared_and_not_blamed_on_a_probe(recorded, store):
    code = TRAIN.replace('    flor.log("val", val)\n', "")
    df = flor.replay("t", code=code, epochs="2", store=store)
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]
    assert "Not compared: val (the replayed code does not log it)" in df.attrs["verdict"]
    assert "probe" not in df.attrs["verdict"]


def test_removed_training_line_is_diagnosed_as_a_code_change(recorded, store):
    code = TRAIN.replace("        ema.update(model)\n", "")
    df = flor.replay("t", code=code, epochs="2", store=store)
    v = df.attrs["verdict"]
    assert not df.attrs["fidelity"]["faithful"]
    assert "changed or removed recorded line(s) 8" in v and "A probe changed training" not in v


def test_wall_clock_values_are_named_not_compared(store):
    setup = SETUP + "import time\n"
    code = TRAIN.replace("    model.train()\n", "    model.train()\n    t0 = time.time()\n").replace(
        '    flor.log("val", val)\n', '    flor.log("val", val)\n    dt = time.time() - t0\n    flor.log("dt", dt)\n')
    record(store, code=code, setup=setup, name="timed")
    df = flor.replay("timed", code=code, epochs="2-3", store=store)
    fid = df.attrs["fidelity"]
    assert fid["faithful"], df.attrs["verdict"]
    clock = {k: v for k, v in fid["not_compared"].items() if k != "left_out"}  # left_out: a skipped step loop's batch
    assert clock == {"variables": ["dt", "t0"], "metrics": ["dt"]}
    assert "Not compared (wall-clock values, different in every run): metric dt; variables dt, t0" in df.attrs["verdict"]


def test_what_cannot_be_captured_is_listed_at_record_and_in_the_verdict(store):
    setup = SETUP + "import threading\nclass Guard:\n    def __init__(self):\n        self.lock = threading.Lock()\n" \
                    "        self.count = 0\nguard = Guard()\nbatches = iter(loader)\n"
    code = TRAIN.replace("        ema.update(model)\n", "        ema.update(model)\n        guard.count += 1\n")
    code = code.replace("    model.eval()\n", "    model.eval()\n    first = next(batches, None)\n")
    with pytest.warns(NotCapturedWarning, match=r"guard.lock: lock"):
        run = record(store, code=code, setup=setup, name="leaky")
    assert set(run.state["not_captured"]) == {"guard.lock"}
    assert "saved as its position" in run.state["notes"]["batches"]  # a DataLoader iterator: see test_iterators
    assert "not_captured" in flor.runs(store=store).columns
    assert flor.runs(store=store).set_index("name").loc["leaky", "not_captured"] == "guard.lock"
    probed = code.replace("    model.eval()\n", "    model.eval()\n    flor.log('count', guard.count)\n")
    df = flor.replay("leaky", code=probed, epochs="3", store=store)
    fid, v = df.attrs["fidelity"], df.attrs["verdict"]
    # The iterator is drawn forward to its position, but its order was drawn (at its first batch, in epoch 0)
    # from the loader's generator after epoch 0 had used it: the replay cannot redraw that, and says so.
    assert fid["level"] == "not faithful" and set(fid["not_captured_read"]) == {"guard.lock"}
    assert "(1) the replayed code reads guard.lock, which could not be captured" in v, v
    assert "the DataLoader iterator batches was brought to its recorded position" in v, v
    assert "Not captured but read by the replayed code: guard.lock" in v
    assert df[df.step.isna()]["count"].tolist() == [32]  # guard.count itself was captured


def test_not_captured_object_that_does_not_change_training_is_a_caveat(store):
    setup = SETUP + "import threading\nclass Guard:\n    def __init__(self):\n        self.lock = threading.Lock()\n" \
                    "        self.count = 0\nguard = Guard()\n"
    code = TRAIN.replace("        ema.update(model)\n", "        ema.update(model)\n        guard.count += 1\n")
    with pytest.warns(NotCapturedWarning, match="guard.lock"):
        record(store, code=code, setup=setup, name="locked")
    df = flor.replay("locked", code=code, epochs="3", store=store)
    assert df.attrs["fidelity"]["level"] == "caveats" and df.attrs["fidelity"]["faithful"]
    assert df.attrs["verdict"].startswith("Replay reproduced the recording, with caveats: recorded metrics")
    assert df.attrs["verdict"].endswith("Not captured but read by the replayed code: guard.lock (lock: a lock "
                                        "(threading) cannot be saved). Values that depend on it may differ from "
                                        "the recording.")


def test_state_narrowed_by_flag_is_listed(store):
    run = record(store, name="narrow", state_spec="model,opt,sched")
    assert run.state["not_captured"]["ema"] == "left out by --state"
    with pytest.raises(FlorError, match="--state names nothere"):
        record(store, name="bad", state_spec="+nothere")


def test_checkpoints_name_their_hash_and_old_ones_still_verify(recorded, store):
    ck = store.checkpoints(recorded.id)[2]
    assert checkpoint.read(store.home, ck["path"])["header"]["hash"] == "xxh3_128"
    # Stores written where only blake2b was available (flor_nb 0.1 without xxhash) must still verify,
    # whether the header names the algorithm or (schema 2) does not.
    snap = flor.state.Capturer(namespace(), flor.state.Scope(set(), {"model", "opt"})).snapshot()
    checkpoint.write(store.home, "old.ckpt", snap, algorithm="blake2b_128")
    back = checkpoint.read(store.home, "old.ckpt")
    assert back["header"]["hash"] == "blake2b_128"
    assert torch.equal(back["tensors"]["obj/model"]["0.weight"], snap["tensors"]["obj/model"]["0.weight"])
    path = store.home / "old.ckpt"
    uncompress_checkpoint(path, "old.ckpt", 4)  # schema 4: signed, nothing compressed
    assert torch.equal(checkpoint.read(store.home, "old.ckpt")["tensors"]["obj/model"]["0.weight"],
                       snap["tensors"]["obj/model"]["0.weight"])
    checkpoint.resign(store.home, "old.ckpt")  # rewritten as the current schema
    assert checkpoint.read(store.home, "old.ckpt")["header"]["schema"] == checkpoint.SCHEMA
    uncompress_checkpoint(path, "old.ckpt", 2)  # schema 2: no signature, no hash named
    with pytest.raises(flor.errors.UntrustedStoreError, match="not signed with your key"):
        checkpoint.read(store.home, "old.ckpt")
    flor.trust(store.home)  # unsigned files of an older flor_nb are read once the user vouches for the store
    back = checkpoint.read(store.home, "old.ckpt")
    assert back["header"]["schema"] == checkpoint.SCHEMA
    assert torch.equal(back["tensors"]["obj/model"]["0.weight"], snap["tensors"]["obj/model"]["0.weight"])
    assert hashing.known("blake2b_128") and "xxhash" in open(flor.__file__.replace("flor_nb/__init__.py",
                                                                                "pyproject.toml")).read()


def test_damaged_blob_of_python_state_is_detected(recorded, store):
    ck = store.checkpoints(recorded.id)[3]
    snap = checkpoint.read(store.home, ck["path"])
    pyblobs = [v for k, v in checkpoint.split(snap)[1].items() if isinstance(v, dict) and "__pyblob__" in v]
    h = pyblobs[0]["__pyblob__"]
    path = store.home / "blobs" / h[:2] / h
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CorruptCheckpointError, match="damaged"):
        checkpoint.read(store.home, ck["path"])


def test_epochs_without_a_checkpoint_are_still_checked(store):
    """A tiny overhead budget skips checkpoints; the state is still digested, and every replayed epoch is
    checked at or after it."""
    slow = TRAIN.replace("    model.eval()\n", "    model.eval()\n    time.sleep(0.2)\n")  # digest every epoch
    flor.record(slow, name="sparse", namespace=namespace(SETUP + "import time\n"),
                cells=[f"EPOCHS = 6\n{SETUP}import time\n"], store=store, overhead=1e-9)
    run = flor.get_run("sparse", store=store)
    assert sorted(store.checkpoints(run.id)) == [-1, 0]
    assert 5 in {e for e, _ in store.digests(run.id)}  # the loop's last epoch always gets one
    ok = flor.replay("sparse", code=slow.replace("    sched.step()\n", PROBES + "    sched.step()\n"), epochs="3-4",
                     store=store)
    fid = ok.attrs["fidelity"]
    assert fid["level"] == "faithful" and fid["state"]["unchecked"] == [] and max(fid["state"]["epochs"]) >= 4
    bad = flor.replay("sparse", code=slow.replace("    model.eval()\n", "    model.eval(); np.random.rand()\n"),
                      epochs="4", store=store)
    assert re.match(r"Replay NOT faithful: numpy's global RNG differs after epoch [1-5]:", bad.attrs["verdict"])


def test_values_too_large_to_store_are_checked_by_hash(store, monkeypatch):
    """Over FLOR_NB_MAX_VALUE_BYTES a tensor is not stored; replay checks the rebuilt one against its hash."""
    monkeypatch.setenv("FLOR_NB_MAX_VALUE_BYTES", "4000")  # X (256 x 10 float32 = 10 kB) is "too large" here
    run = record(store, name="big")
    assert run.state["limits"]["max_bytes"] == 4000
    ck = store.checkpoints(run.id)[1]
    assert "X" in checkpoint.read(store.home, ck["path"])["python"]["big"]
    ok = flor.replay("big", code=PROBED, epochs="2", store=store)
    assert ok.attrs["fidelity"]["faithful"], ok.attrs["verdict"]
    cell = flor.get_run("big", store=store).deps[0]
    other = cell["source"].replace("X = torch.randn(256, 10)", "X = torch.randn(256, 10) * 1.5")
    bad = flor.replay("big", code=PROBED, epochs="2", cells={cell["count"]: other}, store=store)
    assert not bad.attrs["fidelity"]["faithful"]
    assert "X (too large to store) differs from the recording when restoring epoch 1" in bad.attrs["verdict"]


def test_a_value_too_large_to_capture_is_listed_and_named_in_the_verdict(store, monkeypatch):
    """Past FLOR_NB_MAX_OBJECTS a container is not cut off silently: it is announced, with the limit, when it
    first grows past it, listed with the run, and a replay that reads it says so."""
    monkeypatch.setenv("FLOR_NB_MAX_OBJECTS", "5000")  # seen grows by 4,000 tuples (12,000 objects) an epoch
    code = TRAIN.replace("seen.extend([loss.item()] * 500)", "seen.extend((loss.item(), i) for i in range(500))")
    with pytest.warns(NotCapturedWarning, match=r"seen: list of 4,000 items too large to capture \(over 5,000 "
                                                r"objects; raise FLOR_NB_MAX_OBJECTS"):  # its size when first over
        run = record(store, code=code, name="huge")
    assert list(run.state["not_captured"]) == ["seen"]
    assert flor.runs(store=store).set_index("name").loc["huge", "not_captured"] == "seen"
    probed = code.replace("    sched.step()\n", "    flor.log('seen_len', len(seen))\n    sched.step()\n")
    df = flor.replay("huge", code=probed, epochs="3", store=store)
    fid, v = df.attrs["fidelity"], df.attrs["verdict"]
    assert list(fid["not_captured_read"]) == ["seen"] and fid["level"] in ("caveats", "not faithful")
    assert "Not captured but read by the replayed code: seen (list of 4,000 items too large to capture" in v, v


def test_files_the_replayed_code_writes_are_named(store, tmp_path):
    """Re-running an epoch re-runs its side effects (an early-stopping helper saving the best model)."""
    setup = SETUP + "def save_best(m, path):\n    torch.save(m.state_dict(), path)\n"
    code = TRAIN.replace("    if stopper.step(val):\n", "    save_best(model, 'best.pt')\n    if stopper.step(val):\n")
    record(store, code=code, setup=setup, name="saver")
    recorded = (tmp_path / "best.pt").read_bytes()
    df = flor.replay("saver", code=code, epochs="2", store=store)
    best = str(tmp_path / "best.pt")
    assert df.attrs["fidelity"]["writes"] == [best]
    assert df.attrs["verdict"].endswith(f"Note: the replayed code wrote {best}; it holds what the replay computed "
                                        "now, not what training left there.")
    assert (tmp_path / "best.pt").read_bytes() != recorded  # it really was overwritten: hence the note


def test_files_moved_into_place_or_removed_by_the_replayed_code_are_named(store, tmp_path):
    """fsspec (Lightning's checkpoints) writes a temporary file and renames it into place, which no ``open`` of
    the destination shows; a replay that removes a file or a folder (``shutil.rmtree``: names relative to an open
    folder) that was there before says so too."""
    setup = SETUP + ("import os, shutil, tempfile\n"
                     "def save_best(m, path):\n"
                     "    fd, tmp = tempfile.mkstemp()\n"
                     "    os.close(fd)\n"
                     "    torch.save(m.state_dict(), tmp)\n"
                     "    os.replace(tmp, path)\n"
                     "    if os.path.exists('stale.txt'):\n"
                     "        os.remove('stale.txt')\n"
                     "    shutil.rmtree('old-run', ignore_errors=True)\n")
    code = TRAIN.replace("    if stopper.step(val):\n", "    save_best(model, 'best.pt')\n    if stopper.step(val):\n")
    record(store, code=code, setup=setup, name="mover")
    (tmp_path / "stale.txt").write_text("made after the recording")
    (tmp_path / "old-run" / "ckpt").mkdir(parents=True)
    (tmp_path / "old-run" / "ckpt" / "model.pt").write_text("made after the recording")
    verdict = flor.replay("mover", code=code, epochs="2", store=store).attrs["verdict"]
    assert f"the replayed code wrote {tmp_path / 'best.pt'}; it holds" in verdict, verdict
    assert (f"the replayed code removed {tmp_path / 'old-run'}/, {tmp_path / 'stale.txt'}, which existed before the "
            "replay") in verdict, verdict
    assert "/tmp" not in verdict.replace(str(tmp_path), "")  # the temporary file is not the user's


def test_non_persistent_buffers_are_checked_in_the_same_order_in_every_process(store):
    """A module's non-persistent buffers (BERT's ``position_ids`` and ``token_type_ids``) were digested in the order
    of a set of their names, which changes with each process's hash seed: the HF course's replay was "NOT faithful:
    buf/trainer.model differs" one time in two. Six buffers: a replay in another process orders them alike."""
    setup = SETUP + ("for i, name in enumerate(['alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta']):\n"
                     "    model[0].register_buffer('nb_' + name, torch.full((2,), float(i)), persistent=False)\n")
    record(store, setup=setup, name="bufs")
    for _ in range(2):
        verdict = flor.replay("bufs", epochs="2", store=store).attrs["verdict"]
        assert verdict.startswith("Faithful replay"), verdict


def test_tensors_sharing_storage_with_the_model_stay_views(store):
    """``best = model.state_dict()`` without a copy (nanoGPT's checkpoint dict) follows the model as it trains:
    after a restore it must again be a view of the parameters, not a frozen copy."""
    setup = SETUP + "best = None\n"
    code = TRAIN.replace("    sched.step()\n", "    sched.step()\n    if epoch == 1:\n        best = model.state_dict()\n")
    record(store, code=code, setup=setup, name="alias")
    probed = code + "    flor.log('best_w', float(best['0.weight'].sum()) if best is not None else 0.0)\n"
    truth = record(store, code=probed, setup=setup, name="alias_truth")
    df = flor.replay("alias", code=probed, epochs="4", store=store)
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]
    want = flor.dataframe("best_w", run=truth.label, store=store)
    assert epoch_values(df, ["best_w"], {4}) == epoch_values(want, ["best_w"], {4})


def test_a_held_optimizer_state_dict_follows_the_optimizer(store):
    """nanoGPT keeps ``checkpoint = {"model": ..., "optimizer": opt.state_dict()}`` between saves: its
    'state' entries are the optimizer's live dicts, which keep stepping. Restore keeps that link."""
    setup = SETUP + "checkpoint = None\n"
    code = TRAIN.replace("    sched.step()\n", (
        "    sched.step()\n"
        "    if epoch == 1:\n"
        "        checkpoint = {'model': model.state_dict(), 'optimizer': opt.state_dict(), 'epoch': epoch}\n"))
    record(store, code=code, setup=setup, name="held")
    probed = code + ("    if checkpoint is not None:\n"
                     "        flor.log('held', float(checkpoint['optimizer']['state'][0]['momentum_buffer'].sum()))\n")
    truth = record(store, code=probed, setup=setup, name="held_truth")
    df = flor.replay("held", code=probed, epochs="4", store=store)
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]
    want = flor.dataframe("held", run=truth.label, store=store)
    assert epoch_values(df, ["held"], {4}) == epoch_values(want, ["held"], {4})


SPARSE_SETUP = '''
import torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
emb = nn.Embedding(50, 8, sparse=True)  # sparse gradients, as PyTorch's docs pair it with SparseAdam
head = nn.Linear(8, 2)
opt = torch.optim.SparseAdam(list(emb.parameters()))
opt2 = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
idx = torch.randint(0, 50, (64,)); y = idx % 2
'''
SPARSE_TRAIN = '''
for epoch in range(4):
    for i in range(0, 64, 16):
        loss = F.cross_entropy(head(emb(idx[i:i + 16])), y[i:i + 16])
        opt.zero_grad(); opt2.zero_grad(); loss.backward(); opt.step(); opt2.step()
        flor.log("loss", loss.item())
    flor.log("g", float(emb.weight.grad.coalesce().values().abs().sum()))
'''


def _checkpointed_and_replayed(tmp_path, name, setup, train, probe, column):
    """Record ``train`` (checkpoint every epoch) and a truth run with ``probe`` from the start: every checkpoint
    and digest is kept, and the epoch-2 replay with the probe is faithful and equals the truth's ``column``."""
    runs = {}
    for label, code in ((name, train), ("truth", probe)):
        ns = {"flor": flor}
        exec(setup, ns)
        runs[label] = flor.record(code, name=label, namespace=ns, cells=[setup], store=tmp_path,
                                  overhead=float("inf"), progress=False)
    run = runs[name]
    assert run.state["checkpoint_error"] is None and not run.state["digest_errors"], run.state
    assert sorted(flor.get_store(tmp_path).checkpoints(run.id)) == list(range(-1, 4))
    out = flor.replay(name, code=probe, epochs=[2], store=tmp_path)
    assert out.attrs["fidelity"]["faithful"], out.attrs["verdict"]
    truth = flor.dataframe(column, run="truth", store=tmp_path).dropna(subset=[column])
    got = out.dropna(subset=[column])[column].tolist()
    assert got and got == truth[truth["epoch"] == 2][column].tolist()


def test_sparse_gradients_are_checkpointed_and_restored(tmp_path):
    """nn.Embedding(sparse=True) leaves sparse COO gradients: they used to stop every checkpoint and digest
    ("unsupported memory format option Contiguous"); now their indices and values are stored and rebuilt."""
    probe = SPARSE_TRAIN.replace('flor.log("loss", loss.item())',
                                 'flor.log("loss", loss.item()); flor.log("w", float(emb.weight.detach().sum()))')
    _checkpointed_and_replayed(tmp_path, "sparse", SPARSE_SETUP, SPARSE_TRAIN, probe, "w")


CSR_SETUP = '''
import torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
X = torch.randn(40, 6); y = (X[:, 0] > 0).long()
A = ((torch.rand(40, 40) > 0.8).float() + torch.eye(40)).to_sparse_csr()  # a graph's adjacency, as CSR
B = torch.eye(40).to_sparse_csc()
lin = nn.Linear(6, 2)
opt = torch.optim.SGD(lin.parameters(), lr=0.1)
'''
CSR_TRAIN = '''
for epoch in range(4):
    for i in range(2):
        loss = F.cross_entropy(lin(A @ (B @ X)), y)
        opt.zero_grad(); loss.backward(); opt.step()
        flor.log("loss", loss.item())
    A = A * 0.9  # the state a replay restores changes every epoch
'''


def test_compressed_sparse_tensors_are_checkpointed_and_restored(tmp_path):
    """A CSR (and a CSC) tensor in the state is stored as its layout and dense parts and rebuilt: replay of
    epoch 2 restores the A of epoch 1's end, and its probe values are those of a run with the probe."""
    probe = CSR_TRAIN.replace('flor.log("loss", loss.item())',
                              'flor.log("loss", loss.item()); flor.log("a", float(A.values().sum()))')
    _checkpointed_and_replayed(tmp_path, "csr", CSR_SETUP, CSR_TRAIN, probe, "a")


WEAK_SETUP = '''
import weakref
import torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 8)  # keeps _flat_weight_refs: weak references to its own parameters
        self.fc = nn.Linear(8, 2)
    def forward(self, x):
        return self.fc(self.rnn(x)[0][-1])
net = Net()
opt = torch.optim.Adam(net.parameters(), lr=0.05)
X = torch.randn(5, 16, 3); y = (X.sum((0, 2)) > 0).long()
watch = {"fc": weakref.ref(net.fc.weight)}  # a weak reference of the user's, to captured state
class Registry: pass
registry = Registry()
elsewhere = weakref.ref(registry)  # to an object the cell never reads
'''
WEAK_TRAIN = '''
for epoch in range(4):
    for i in range(2):
        loss = F.cross_entropy(net(X), y)
        opt.zero_grad(); loss.backward(); opt.step()
        flor.log("loss", loss.item())
    assert watch["fc"]() is net.fc.weight and elsewhere() is not None
'''


def test_weak_references_to_captured_state_are_saved_and_point_at_the_restored_objects(tmp_path):
    """An LSTM holds weak references to its own parameters: they were listed as not captured, so every replay
    of an LSTM said "Not captured but read by the replayed code". A weak reference to an object the state holds
    is now saved as one, and a replay's points at the restored object; one to anything else is still listed."""
    probe = WEAK_TRAIN.replace('flor.log("loss", loss.item())',
                               'flor.log("loss", loss.item()); flor.log("w", float(watch["fc"]().sum()))')
    ns = {"flor": flor}
    exec(WEAK_SETUP, ns)
    run = flor.record(WEAK_TRAIN, name="weak", namespace=ns, cells=[WEAK_SETUP], store=tmp_path,
                      overhead=float("inf"), progress=False)
    assert list(run.state["not_captured"]) == ["elsewhere"], run.state["not_captured"]
    assert "a Registry the captured state does not hold" in run.state["not_captured"]["elsewhere"]
    _checkpointed_and_replayed(tmp_path, "lstm", WEAK_SETUP, WEAK_TRAIN, probe, "w")
    out = flor.replay("lstm", code=probe, epochs=[2], store=tmp_path)
    assert "_flat_weight_refs" not in out.attrs["verdict"] and "elsewhere" in out.attrs["verdict"], out.attrs["verdict"]


def test_a_run_recorded_before_weak_references_were_saved_still_replays_faithfully(tmp_path, monkeypatch):
    """Its checkpoints left weak references out: its replays walk the same way, so the pickles compare."""
    from flor_nb import capture, state
    old = {k: v for k, v in capture.limits().items() if k != "weak_refs"}
    monkeypatch.setattr(state, "capture_limits", lambda: dict(old))
    ns = {"flor": flor}
    exec(WEAK_SETUP, ns)
    flor.record(WEAK_TRAIN, name="old", namespace=ns, cells=[WEAK_SETUP], store=tmp_path,
                overhead=float("inf"), progress=False)
    monkeypatch.undo()
    out = flor.replay("old", epochs=[2], store=tmp_path)
    assert out.attrs["fidelity"]["faithful"], out.attrs["verdict"]
    assert "_flat_weight_refs" in out.attrs["verdict"], out.attrs["verdict"]  # listed, as it was recorded


def test_a_class_with_a_metaclass_held_by_the_state_is_restored_as_itself(store):
    """LightningCLI's argument parser keeps tuples of classes whose type is a metaclass (``ABCMeta``): restoring
    the object that holds them must bind the classes, not walk into their ``__dict__`` (a read-only
    mappingproxy: that failed the replay of Lightning's autoencoder example in its first epoch)."""
    setup = SETUP + ("import abc, collections.abc, numbers\nclass Base(abc.ABC):\n    pass\nclass Chosen(Base):\n"
                     "    pass\nclass Config:\n    def __init__(self):\n        self.model_class, self.seen = Chosen, 0\n"
                     "        self.bases = (collections.abc.Sequence, numbers.Number, Base)\ncfg = Config()\n")
    code = TRAIN.replace("    sched.step()\n", "    cfg.seen += 1\n    sched.step()\n")
    record(store, code=code, setup=setup, name="meta")
    probe = code.replace("    sched.step()\n", "    flor.log('cls', cfg.model_class.__name__)\n"
                                                 "    flor.log('seen', cfg.seen)\n"
                                                 "    flor.log('bases', len(cfg.bases))\n    sched.step()\n")
    df = flor.replay("meta", code=probe, epochs="3", store=store)
    assert "Faithful replay" in df.attrs["verdict"], df.attrs["verdict"]
    rows = df[df["step"].isna() & (df["epoch"] == 3)]
    assert list(rows["cls"]) == ["Chosen"] and list(rows["seen"]) == [4] and list(rows["bases"]) == [3]
