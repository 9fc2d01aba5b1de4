"""Checkpoints between iterations leave out what the next iteration recomputes first (liveness.py), and
replay never restores from one that lacks what the replayed code reads."""
from __future__ import annotations

import ast
import time

import pytest

import flor_nb as flor
from flor_nb import checkpoint, liveness

SETUP = '''
import torch, torch.nn.functional as F
g = torch.Generator().manual_seed(7)
Xtr = torch.randint(0, 27, (400, 3), generator=g)
Ytr = torch.randint(0, 27, (400,), generator=g)
C = torch.randn((27, 10), generator=g)
W1 = torch.randn((30, 64), generator=g) * 0.2
b1 = torch.zeros(64)
W2 = torch.randn((64, 27), generator=g) * 0.01
b2 = torch.zeros(27)
parameters = [C, W1, b1, W2, b2]
for p in parameters:
    p.requires_grad = True
lossi = []
'''
# makemore's training loop, verbatim but for its size
TRAIN = '''
for i in range(max_steps):
    ix = torch.randint(0, Xtr.shape[0], (32,), generator=g)
    emb = C[Xtr[ix]]
    h = torch.tanh(emb.view(emb.shape[0], -1) @ W1 + b1)
    logits = h @ W2 + b2
    loss = F.cross_entropy(logits, Ytr[ix])
    for p in parameters:
        p.grad = None
    loss.backward()
    lr = 0.1 if i < 20 else 0.01
    for p in parameters:
        p.data += -lr * p.grad
    lossi.append(loss.log10().item())
    flor.log("loss", loss.item())
'''
AFTER = TRAIN.replace("    lossi.append", "    flor.log('h_mean', float(h.mean()))\n"
                      "    flor.log('w1_grad', float(W1.grad.norm()))\n    lossi.append")
BEFORE = TRAIN.replace("    ix = torch", "    if i > 0:\n        flor.log('prev_h', float(h.sum()))\n"
                       "        flor.log('prev_grad', float(W1.grad.sum()))\n    ix = torch")


def namespace(steps):
    ns = {"flor": flor, "max_steps": steps}
    exec(SETUP, ns)
    return ns


def record(store, name, code, steps=30):
    return flor.record(code, name=name, namespace=namespace(steps), cells=[f"max_steps = {steps}\n{SETUP}"],
                       store=store, overhead=float("inf"))


def values(frame, names, lo, hi):
    rows = frame[(frame["epoch"] >= lo) & (frame["epoch"] <= hi)]
    return {(int(r["epoch"]), n): r[n] for _, r in rows.iterrows() for n in names if n in r and r[n] == r[n]}


def test_checkpoints_between_iterations_leave_out_what_the_next_recomputes(store):
    run = record(store, "mm", TRAIN)
    assert set(run.state["dead"]["names"]) >= {"emb", "h", "logits", "loss", "ix"}
    assert run.state["dead"]["cleared"] == [["list", "parameters"]]
    omitting = run.state["omitting"]
    assert omitting and max(omitting) < run.epochs_completed - 1  # never the last unit
    ckpts = store.checkpoints(run.id)
    middle = checkpoint.read(store.home, ckpts[omitting[0]]["path"])
    last = checkpoint.read(store.home, ckpts[run.epochs_completed - 1]["path"])
    for key in ("val/h", "val/emb", "val/logits", "valgrad/W1", "valgrad/C"):
        assert key not in middle["tensors"] and key in middle["python"]["omitted"]
        assert key in last["tensors"]  # the code after the loop may read them
    digests = checkpoint.tensor_digests(last["tensors"])
    header = ckpts[omitting[0]]["digest"]
    assert "val/h" in header and "valgrad/W1" in header  # still checked by replay
    assert digests["val/h"]  # same stream names in a full checkpoint
    assert "val/W1" in middle["tensors"] and "val/Xtr" in middle["tensors"]  # the state itself is kept


@pytest.mark.parametrize("probed", ["after", "before"])
def test_replay_is_exact_whether_or_not_the_probe_reads_what_was_left_out(store, probed):
    code = AFTER if probed == "after" else BEFORE
    names = ["h_mean", "w1_grad"] if probed == "after" else ["prev_h", "prev_grad"]
    record(store, "mm", TRAIN)
    record(store, "truth", code)
    df = flor.replay("mm", code=code, epochs="20-24", store=store)
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]
    truth = flor.dataframe(*names, run="truth", store=store)
    got = values(df, names, 20, 24)
    assert got and got == values(truth, names, 20, 24)
    plan = df.attrs["fidelity"]["plan"]
    if probed == "before":  # h and the gradients of iteration 19 are needed: not from a checkpoint lacking them
        assert "left them out" in plan, plan
    else:
        assert "left" not in plan, plan


def _dead(body: str, reads=()) -> liveness.Dead:
    loop = ast.parse(body).body[0]
    return liveness.dead_at_unit_start(loop, set(reads), lambda call: True)


def test_liveness_is_conservative():
    assert _dead("for i in r:\n    h = f(x)\n    y = h + 1\n").names == {"h", "y"}
    assert _dead("for i in r:\n    y = h + 1\n    h = f(x)\n").names == {"y"}  # read first: live
    assert _dead("for i in r:\n    h += 1\n").names == set()
    assert _dead("for i in r:\n    if c:\n        continue\n    h = f(x)\n").names == set()  # may skip it
    assert _dead("for i in r:\n    h = f(x)\n", reads={"h"}).names == set()  # a function reads it
    assert _dead("for i in r:\n    h = f(x)\n    eval('h')\n").names == set()
    assert _dead("for i in r:\n    h = f(x)\n    del h\n").names == set()
    assert _dead("for i in r:\n    if c:\n        h = 1\n    y = h\n").names == {"y"}  # conditional binding
    assert _dead("for i in r:\n    opt.zero_grad()\n    loss.backward()\n").cleared == (("zero_grad", "opt"),)
    assert _dead("for i in r:\n    opt.zero_grad(set_to_none=False)\n").cleared == ()  # zeros, not None
    assert _dead("for i in r:\n    loss.backward()\n    opt.zero_grad()\n").cleared == ()  # read first


def test_an_edited_helper_that_mentions_gradients_needs_them():
    """Calls before the clearing were judged with the recorded helpers; an edited helper may read p.grad."""
    dead = liveness.Dead(frozenset({"h"}), (("list", "parameters"),), 8)
    assert liveness.for_replay(dead, TRAIN, TRAIN, {}, [SETUP]) == (set(), False, ())
    helper = "def batch():\n    flor.log('g', float(W1.grad.norm()))\n    return torch.randint(0, 27, (32,))\n"
    assert liveness.for_replay(dead, TRAIN, TRAIN, {}, [SETUP, helper], edited=[helper]).grads is True


def test_a_slow_start_checkpoint_delays_no_boundary_under_overhead_inf(store, monkeypatch):
    """Iterations do not wait for the start checkpoint's write: their first boundary waits for a later iteration.
    With ``--overhead inf`` (every unit) none may be skipped: a start write slower than the whole loop (a busy
    disk, CI) left 30 iterations with no checkpoint but the start one."""
    from flor_nb import checkpointing

    persist = checkpointing.Checkpointing._persist

    def slow(self, epoch, *args, **kw):
        if epoch == -1:
            time.sleep(0.5)
        return persist(self, epoch, *args, **kw)

    monkeypatch.setattr(checkpointing.Checkpointing, "_persist", slow)
    run = record(store, "slow", TRAIN)
    assert len(store.checkpoints(run.id)) == 31 and "dead" in run.state
