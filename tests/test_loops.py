"""Which loops are the epoch and step loops: the loop over the training data, the same at record and replay."""
from __future__ import annotations

import pickle
import sys

import pytest

import flor_nb as flor
from conftest import SETUP, TRAIN, setup_namespace
from flor_nb import errors
from flor_nb.instrument import instrument

BATCH = "    for xb, yb in loader:\n"


def _step_line(code: str) -> int:
    return code.splitlines().index(BATCH.rstrip("\n")) + 1


@pytest.mark.parametrize("before", [
    "    for g in opt.param_groups:\n        g['lr'] = 0.1 * 0.9 ** epoch\n",
    "    for p in model.parameters():\n        p.grad = None\n",
    "    for name, p in model.named_parameters():\n        p.requires_grad_(True)\n",
    "    for layer in model:\n        layer.train()\n",
])
def test_loops_over_parameters_are_never_the_step_loop(before):
    code = TRAIN.replace("    model.train()\n", "    model.train()\n" + before)
    _, loops = instrument(code)
    assert loops.step_line == _step_line(code)


def test_micro_steps_and_eval_loops_leave_the_batch_loop_the_step_loop():
    micro = TRAIN.replace(
        "        loss = F.cross_entropy(model(xb), yb)\n        opt.zero_grad(); loss.backward()\n",
        "        opt.zero_grad()\n        for micro in range(2):\n"
        "            loss = F.cross_entropy(model(xb[micro::2]), yb[micro::2]); loss.backward()\n")
    assert instrument(micro)[1].step_line == _step_line(micro)
    by_hand = ("for epoch in range(3):\n    for i in range(0, len(X), 32):\n        for m in range(n_micro_batches):\n"
               "            model(X[i + m]).sum().backward()\n        opt.step()\n")
    assert instrument(by_hand)[1].step_line == 2
    evals_first = TRAIN.replace("    model.train()\n", "    model.eval()\n    for xb, yb in val_loader:\n"
                                "        flor.log('val', float(model(xb).sum()))\n    model.train()\n")
    assert instrument(evals_first)[1].step_line == _step_line(evals_first)


def test_a_schedulers_step_in_the_epoch_loop_is_not_a_training_step():
    """pytorch/examples' MNIST: ``train(...)``, ``test(...)``, ``scheduler.step()``. The batch loop is in the helper;
    one pass of the cell's loop is an epoch, not one optimizer step."""
    import torch

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ns = {"opt": opt, "scheduler": torch.optim.lr_scheduler.StepLR(opt, 1), "train": lambda *a: None}
    cell = "for epoch in range(3):\n    train(model, opt)\n    scheduler.step()\n"
    assert instrument(cell, namespace=ns)[1].unit == "epochs"
    assert instrument(cell.replace("scheduler.step()", "opt.step()"), namespace=ns)[1].unit == "iterations"
    assert instrument(cell)[1].unit == "iterations"  # without the namespace: it may be an optimizer


def test_two_training_loops_ask_for_a_marker():
    code = TRAIN.replace("    sched.step()\n", "    for xb, yb in other_loader:\n        loss = F.cross_entropy("
                         "model(xb), yb); loss.backward(); opt.step()\n    sched.step()\n")
    with pytest.raises(errors.AmbiguousLoopError) as info:
        instrument(code)
    second = code.splitlines().index("    for xb, yb in other_loader:") + 1
    assert info.value.lines == [_step_line(code), second]
    assert f"line {_step_line(code)} `for xb, yb in loader:`" in str(info.value)
    assert 'for xb, yb in flor.loop("step", loader):' in str(info.value)
    assert pickle.loads(pickle.dumps(info.value)).lines == info.value.lines
    marked = code.replace(BATCH, '    for xb, yb in flor.loop("step", loader):\n')
    assert instrument(marked)[1].step_line == _step_line(code)


# The training loop is over `tr`, a DataLoader whose name says nothing, through a helper; an evaluation
# loop over another DataLoader comes first. Only the namespace (record time) tells them apart.
HELPER = "def fit_batch(xb, yb):\n    loss = F.cross_entropy(model(xb), yb)\n    opt.zero_grad(); loss.backward()\n" \
         "    opt.step()\n    return loss\n"
ODD = '''
for epoch in range(EPOCHS):
    model.eval()
    for xb, yb in ev:
        flor.log("ev_sum", float(model(xb).detach().sum()))
    model.train()
    for xb, yb in tr:
        loss = fit_batch(xb, yb)
        flor.log("loss", loss.item())
    sched.step()
    flor.log("acc", float((model(X).argmax(1) == y).float().mean()))
'''


def test_replay_uses_the_loops_the_recording_chose(store):
    cells = [f"EPOCHS = 4\n{SETUP}\ntr = loader\nev = DataLoader(TensorDataset(X[:64], y[:64]), batch_size=32)\n{HELPER}"]
    ns = {"flor": flor}
    exec(cells[0], ns)
    run = flor.record(ODD, name="odd", namespace=ns, cells=cells, store=store, overhead=float("inf"))
    rows = flor.dataframe("loss", run="odd", store=store)
    assert rows["step"].tolist() == [0, 1, 2, 3, 4, 5] * 4  # per batch of tr, not one epoch-level value
    assert run.state["loops"]["step"]["header"] == "for (xb, yb) in tr"
    # An epoch-level probe: the step loop over tr is skipped, as recorded
    probe = ODD + "    flor.log('wn', weight_norm(model))\n"
    df = flor.replay("odd", code=probe, epochs="1-2", store=store)
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]
    assert set(df.attrs["fidelity"]["modes"].values()) == {"skip"}
    # A step-level probe (with a loop over parameters of its own, before the batches) runs that loop in full
    probe = ODD.replace("        loss = fit_batch(xb, yb)\n", "        loss = fit_batch(xb, yb)\n"
                        "        flor.log('gn', grad_norm(model))\n").replace(
        "    model.train()\n", "    model.train()\n    for g in opt.param_groups:\n        flor.log('lr', g['lr'])\n")
    df = flor.replay("odd", code=probe, epochs=[2], store=store)
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]
    assert df.dropna(subset=["gn"])["step"].tolist() == [0, 1, 2, 3, 4, 5]
    # The step loop's header edited: replay says so, and which loop it uses instead
    edited = ODD.replace("    for xb, yb in tr:\n", "    for i, (xb, yb) in enumerate(tr):\n")
    with pytest.warns(UserWarning, match=r"recorded step loop `for \(xb, yb\) in tr` is not in the edited cell; "
                                         r"using line 7"):
        df = flor.replay("odd", code=edited, epochs=[2], store=store)
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]


def test_runs_recorded_before_loops_were_stored_keep_the_rule_they_were_recorded_with(store):
    """A run from an older flor_nb has no stored loops: its step loop was the first for in the epoch loop."""
    code = TRAIN.replace("    model.train()\n", "    model.train()\n    for p in model.parameters():\n"
                                                  "        p.grad = None\n")
    as_then = code.replace("in model.parameters():", "in flor.loop('step', model.parameters()):")
    run = flor.record(as_then, name="old", namespace=setup_namespace(3), cells=[f"EPOCHS = 3\n{SETUP}"],
                      store=store, overhead=float("inf"))
    store.update_run(run.id, code=code, state={k: v for k, v in run.state.items() if k != "loops"})
    flor.trust(store)  # the store of an older flor_nb is unsigned: its user vouches for it once
    df = flor.replay("old", code=code + "    flor.log('wn', weight_norm(model))\n", epochs="1-2", store=store)
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]
    assert df.attrs["fidelity"]["metrics"]["acc"]["compared"] == 2


def test_a_loop_hidden_in_a_function_is_refused_with_the_way_out(store):
    code = ("def main():\n    for epoch in range(EPOCHS):\n        for xb, yb in loader:\n"
            "            loss = F.cross_entropy(model(xb), yb)\n            opt.zero_grad(); loss.backward(); opt.step()\n"
            "            flor.log('loss', loss.item())\nmain()\n")
    with pytest.raises(flor.FlorError, match=r"inside main\(\) \(line 2\), which the cell calls at line 7.*"
                                             r"flor.loop\('epoch', ...\):` at line 2"):
        flor.record(code, name="hidden", namespace=setup_namespace(3), cells=[f"EPOCHS = 3\n{SETUP}"], store=store)
    assert [r.name for r in store.all_runs()] == []  # refused before anything ran or was stored
    marked = code.replace("for epoch in range(EPOCHS):", "for epoch in flor.loop('epoch', range(EPOCHS)):")
    run = flor.record(marked, name="hidden", namespace=setup_namespace(3), cells=[f"EPOCHS = 3\n{SETUP}"], store=store,
                      overhead=float("inf"))
    assert run.epochs_completed == 3
    df = flor.replay("hidden", code=marked.replace("            flor.log('loss'", "            flor.log('g', 1.0)\n"
                                                   "            flor.log('loss'"), epochs="1", store=store)
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]


WHILE = '''
it = 0
while True:
    xb, yb = X[it % 8 * 16:(it % 8 + 1) * 16], y[it % 8 * 16:(it % 8 + 1) * 16]
    loss = F.cross_entropy(model(xb), yb)
    opt.zero_grad(); loss.backward(); opt.step()
    flor.log("loss", loss.item())
    it += 1
    if it >= 10:
        break
'''


def test_the_iteration_a_while_loop_breaks_in_is_checked_in_replay(store):
    """The recording digests the state where `break` leaves the loop; replay must compare it there too
    (a unit left by `break` never reaches the code after its `yield`)."""
    ns = setup_namespace(1)
    run = flor.record(WHILE, name="brk", namespace=ns, cells=[f"EPOCHS = 1\n{SETUP}"], store=store,
                      overhead=float("inf"))
    assert run.epochs_completed == 10
    probe = WHILE.replace("    it += 1\n", "    flor.log('w', float(model[0].weight.sum()))\n    it += 1\n")
    df = flor.replay("brk", code=probe, iters="9", store=store)
    fid = df.attrs["fidelity"]
    assert fid["level"] == "faithful", df.attrs["verdict"]
    assert 9 in fid["state"]["epochs"]  # the break unit's own check


def _tuned(unit, snapshot, writer_cpu, digest, commit, overhead=0.02, cores_busy=False):
    """The periods the recorder picks from these measured costs (seconds), as at any boundary."""
    import collections
    import types

    from flor_nb.recorder import Recorder

    rec = types.SimpleNamespace(
        _recent=collections.deque([unit] * 9), snapshot_seconds=[snapshot] * 5, write_cpu_seconds=[writer_cpu] * 5,
        write_seconds=[writer_cpu] * 5, digest_seconds=[digest] * 5, commit_seconds=[commit] * 5,
        overhead=overhead, _cores_busy=cores_busy, _period_ckpt=1, _period_digest=1)
    Recorder._tune(rec)
    return rec._period_ckpt, rec._period_digest


@pytest.mark.parametrize("overhead", [0.02, 0.05])
def test_iterations_keep_all_boundary_work_inside_the_overhead_budget(overhead):
    """A step-only loop's boundaries (checkpoint, digest, the commit each one makes) cost at most the budget
    in all, with room left for the per-iteration path: makemore's measured costs (300 us steps, 1.5 ms
    snapshots, 13 ms of writer CPU, 1.4 ms digests, 0.4 ms commits) gave 2% + 1% + commits before."""
    unit, snap, cpu, digest, commit = 300e-6, 1.5e-3, 13e-3, 1.4e-3, 0.4e-3
    p_ckpt, p_digest = _tuned(unit, snap, cpu, digest, commit, overhead)
    spent = ((snap + cpu + commit) / p_ckpt + (digest + commit) / p_digest) / unit
    assert spent <= 0.86 * overhead, (p_ckpt, p_digest, spent)
    assert p_digest < p_ckpt  # replays between checkpoints are still checked


def test_the_writers_cpu_counts_against_training_only_when_training_leaves_fewer_than_two_cores():
    """torch's CPU threads leave fewer than two cores free: the writer's and saver's CPU time is taken from
    training (bench/core_coupling.py: one free core of two is not free), unless the state lives on a GPU (its
    CPU threads idle). Seen on an H100 machine: checkpoints ~10 one-second epochs apart."""
    import types

    import torch

    from flor_nb import machine
    from flor_nb.recorder import Recorder

    for busy, gpu, counted in ((True, False, True), (True, True, False), (False, False, False)):
        rec = types.SimpleNamespace(_busy=busy, _gpu_state=gpu)
        assert Recorder._cores_busy.fget(rec) is counted
    rec = types.SimpleNamespace(_busy=None, _gpu_state=False)
    Recorder._cores_busy.fget(rec)
    assert rec._busy == (machine.usable_cpus() - torch.get_num_threads() < 2)
    threads = torch.get_num_threads()
    try:  # one torch thread: on 2 cores the other core is not free; on 3 it is
        torch.set_num_threads(1)
        for cpus, busy in ((1, True), (2, True), (3, False), (16, False)):
            rec = types.SimpleNamespace(_busy=None, _gpu_state=False)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(machine, "usable_cpus", lambda: cpus)
                assert Recorder._cores_busy.fget(rec) is busy, cpus
    finally:
        torch.set_num_threads(threads)
    # 1 s epochs, 10 ms snapshots, 0.2 s of writer CPU a checkpoint (the H100 run): every epoch when not counted
    assert _tuned(1.0, 10e-3, 0.2, 20e-3, 1e-3, cores_busy=True)[0] == 11
    assert _tuned(1.0, 10e-3, 0.2, 20e-3, 1e-3, cores_busy=False)[0] == 1


def test_epochs_still_get_a_digest_each_when_it_is_cheap():
    """Units of a second: a 1.5 ms digest is 0.15%, so every epoch is checked, as before."""
    assert _tuned(1.0, 20e-3, 0.3, 1.5e-3, 0.5e-3)[1] == 1


TRAINER_PY = '''
import time
import torch


class Trainer:  # the shape of minGPT's: the loop lives in a method of a library class, callbacks reach out
    def __init__(self, model, X, y, iters):
        self.model, self.X, self.y, self.iters = model, X, y, iters
        self.callbacks = []

    def run(self):
        opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.iter_num, self.iter_time = 0, time.time()
        while True:
            i = torch.randint(0, len(self.X), (16,))
            self.loss = torch.nn.functional.cross_entropy(self.model(self.X[i]), self.y[i])
            opt.zero_grad(); self.loss.backward(); opt.step()
            for cb in self.callbacks:
                cb(self)
            self.iter_num += 1
            self.iter_time = time.time()
            if self.iter_num >= self.iters:
                break
'''


def test_a_loop_inside_a_library_method_is_named_and_one_unit_records_it(store, tmp_path, monkeypatch):
    """minGPT's demo calls trainer.run(), whose while loop is in mingpt/trainer.py: the refusal names that loop
    and offers the call as one unit, which records and replays faithfully with a probe in the cell's callback."""
    (tmp_path / "mytrainer.py").write_text(TRAINER_PY)  # beside the notebook (the store fixture's cwd)
    monkeypatch.setattr(sys, "path", list(sys.path))
    setup = ("import sys, torch\nsys.path.insert(0, '.')\nfrom mytrainer import Trainer\ntorch.manual_seed(0)\n"
             "X = torch.randn(64, 4)\n"
             "y = (X[:, 0] > 0).long()\ntrainer = Trainer(torch.nn.Linear(4, 2), X, y, iters=30)\n")
    cell = "def on_batch(t):\n    flor.log('loss', t.loss.item())\ntrainer.callbacks = [on_batch]\ntrainer.run()\n"
    ns = {"flor": flor, "__name__": "__main__"}
    exec(setup, ns)
    with pytest.raises(flor.FlorError, match=r"(?s)inside trainer\.run\(\) \(Trainer\.run, .*mytrainer\.py line 14\), "
                                             r"which the cell calls at line 4.*for _ in flor\.loop\('epoch', "
                                             r"range\(1\)\):\n        trainer\.run\(\)"):
        flor.record(cell, name="lib", namespace=ns, cells=[setup], store=store)
    assert store.all_runs() == []
    unit = cell.replace("trainer.run()\n", "for _ in flor.loop('epoch', range(1)):\n    trainer.run()\n")
    flor.record(unit, name="lib", namespace=ns, cells=[setup], store=store, progress=False)
    probed = unit.replace("    flor.log('loss', t.loss.item())\n",
                          "    flor.log('loss', t.loss.item())\n    flor.log('it', t.iter_num)\n")
    df = flor.replay("lib", code=probed, epochs=0, store=store)
    fid = df.attrs["fidelity"]
    assert fid["faithful"] and fid["metrics"]["loss"]["compared"] == 30, df.attrs["verdict"]
    assert "iter_time of Trainer objects" in df.attrs["verdict"]  # its clock attribute: named, not compared
    assert df.dropna(subset=["it"])["it"].tolist() == list(range(30))
