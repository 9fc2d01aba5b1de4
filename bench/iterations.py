"""Iteration loops: record overhead and store size, for a step-only loop and a while loop.

Two workloads written the way people write them (neither is our own shape of cell):

* ``step``: a makemore-style MLP over character trigrams, ``for i in range(max_steps)`` with a manual
  parameter list, manual SGD and a loss history that grows every step (20,000 steps by default);
* ``while``: a nanoGPT-style tiny transformer, ``while True`` with batches drawn from the global RNG and
  prefetched across iterations, gradient accumulation, an eval every N iterations, AdamW.

Each repetition runs the cell plainly (``flor`` a no-op) and recorded (default overhead budget), in
alternating order (ABBA), each from a freshly built namespace, at one torch thread. Printed: the median
overhead of wall time, of process CPU time and of the main thread's CPU time, each with its range; with
``--control`` also the plain cell against a second plain run (the noise floor of these pairs); what recording
did (checkpoints, digests), and the store: bytes written per kept checkpoint against the bytes of model +
optimizer state.

    .venv/bin/python bench/iterations.py [--reps 3] [--steps 20000] [--iters 1500] [--control]
"""
from __future__ import annotations

import re
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import against_both  # noqa: E402

STEP_SETUP = '''
import torch, torch.nn.functional as F
torch.manual_seed(42)
words = ["emma", "olivia", "ava", "isabella", "sophia", "charlotte", "mia", "amelia", "harper", "evelyn"] * 300
chars = sorted(set("".join(words))); stoi = {s: i + 1 for i, s in enumerate(chars)}; stoi["."] = 0
X, Y = [], []
for w in words:
    context = [0] * 3
    for ch in w + ".":
        X.append(context); Y.append(stoi[ch]); context = context[1:] + [stoi[ch]]
Xtr, Ytr = torch.tensor(X), torch.tensor(Y)
g = torch.Generator().manual_seed(2147483647)
C = torch.randn((27, 10), generator=g)
W1 = torch.randn((30, 200), generator=g) * 0.2
b1 = torch.randn(200, generator=g) * 0.01
W2 = torch.randn((200, 27), generator=g) * 0.01
b2 = torch.randn(27, generator=g) * 0
parameters = [C, W1, b1, W2, b2]
for p in parameters:
    p.requires_grad = True
lossi = []
'''
STEP_TRAIN = '''
for i in range(max_steps):
    ix = torch.randint(0, Xtr.shape[0], (32,), generator=g)
    emb = C[Xtr[ix]]
    h = torch.tanh(emb.view(emb.shape[0], -1) @ W1 + b1)
    logits = h @ W2 + b2
    loss = F.cross_entropy(logits, Ytr[ix])
    for p in parameters:
        p.grad = None
    loss.backward()
    lr = 0.1 if i < max_steps // 2 else 0.01
    for p in parameters:
        p.data += -lr * p.grad
    lossi.append(loss.log10().item())
    flor.log("loss", loss.item())
'''
WHILE_SETUP = '''
import math, time
import numpy as np
import torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(1337)
text = ("the quick brown fox jumps over the lazy dog. " * 400 + "pack my box with five dozen liquor jugs. " * 400)
chars = sorted(set(text)); stoi = {c: i for i, c in enumerate(chars)}
data = np.array([stoi[c] for c in text], dtype=np.uint16)
train_data, val_data = data[:int(0.9 * len(data))], data[int(0.9 * len(data)):]
block_size, batch_size, n_embd, vocab_size, eval_interval, eval_iters, grad_accum = 32, 8, 64, len(chars), 100, 4, 2
def get_batch(split):
    d = train_data if split == "train" else val_data
    ix = torch.randint(len(d) - block_size, (batch_size,))
    x = torch.stack([torch.from_numpy(d[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(d[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    return x, y
class TinyGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, n_embd); self.pos = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(n_embd, 4, 4 * n_embd, dropout=0.1, batch_first=True)
                                    for _ in range(2))
        self.head = nn.Linear(n_embd, vocab_size)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(block_size))
    def forward(self, idx, targets=None):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x, src_mask=self.mask, is_causal=True)
        logits = self.head(x)
        return logits, None if targets is None else F.cross_entropy(logits.view(-1, vocab_size), targets.view(-1))
@torch.no_grad()
def estimate_loss():
    out = {}
    model.eval()
    for split in ["train", "val"]:
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            X, Y = get_batch(split)
            losses[k] = model(X, Y)[1].item()
        out[split] = losses.mean()
    model.train()
    return out
model = TinyGPT()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
iter_num = 0
'''
WHILE_TRAIN = '''
X, Y = get_batch("train")
t0 = time.time()
while True:
    lr = 1e-3 * min(1.0, (iter_num + 1) / 50)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    if iter_num % eval_interval == 0:
        losses = estimate_loss()
        flor.log("val_loss", float(losses["val"]))
    for micro_step in range(grad_accum):
        logits, loss = model(X, Y)
        loss = loss / grad_accum
        X, Y = get_batch("train")
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t1 = time.time(); dt = t1 - t0; t0 = t1
    flor.log("loss", loss.item() * grad_accum)
    iter_num += 1
    if iter_num > max_iters:
        break
'''


class NoFlor:
    @staticmethod
    def log(name, value):
        return value


def namespace(setup, n_name, n, flor):
    ns = {"__name__": "__main__", "flor": flor, n_name: n}
    exec(setup, ns)
    return ns


def state_bytes(ns) -> int:
    """Bytes of the trained state: parameters (a module's or a parameter list) and optimizer state."""
    total = 0
    if "model" in ns:
        total += sum(t.numel() * t.element_size() for t in ns["model"].state_dict().values())
    else:
        total += sum(p.numel() * p.element_size() for p in ns["parameters"])
    opt = ns.get("optimizer")
    if opt is not None:
        total += sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                     if isinstance(t, torch.Tensor))
    return total


def _spread(xs) -> str:
    xs = sorted(xs)
    return f"{statistics.median(xs):+.1%} ({xs[0]:+.1%} .. {xs[-1]:+.1%})"


notes: list = []  # printed after the table


def measure(name, setup, train, n_name, n, reps, control=False):
    """ABBA pairs of the plain and the recorded cell (with ``control``, a second plain arm: the noise floor,
    the same cell against itself). Wall time, process CPU time, and the main thread's CPU time (the
    training thread's own cost, without the writer's)."""
    import flor_nb

    arms = ("plain", "record") + (("plain2",) if control else ())
    wall, cpu, main_cpu = ({a: [] for a in arms} for _ in range(3))
    runs = []
    for rep in range(reps):
        for mode in (arms if rep % 2 == 0 else arms[::-1]):
            ns = namespace(setup, n_name, n, flor_nb if mode == "record" else NoFlor)
            store = tempfile.mkdtemp() if mode == "record" else None
            w, c, t = time.perf_counter(), time.process_time(), time.thread_time()
            if mode == "record":
                run = flor_nb.record(train, name=re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_"), namespace=ns,
                                     cells=[f"{n_name} = {n}\n{setup}"], store=store)
            else:
                exec(train, ns)
            wall[mode].append(time.perf_counter() - w)
            cpu[mode].append(time.process_time() - c)
            main_cpu[mode].append(time.thread_time() - t)
            if mode == "record":
                runs.append((flor_nb.get_store(store), run, state_bytes(ns)))

    def over(d, arm="record"):
        return _spread(r / p - 1 for r, p in zip(d[arm], d["plain"]))

    if control and reps > 1:  # against both plain cells of the rep: a linear drift cancels; mean and its s.e.
        notes.append(f"{name}: recorded against the mean of both plain cells, wall: mean "
                     f"{against_both(wall['record'], wall['plain'], wall['plain2'])}; {reps} reps")
    st, run, raw = runs[-1]
    ck = st.checkpoints(run.id)
    kept = [c for e, c in ck.items() if e >= 0]
    per = statistics.median(c["bytes"] for c in kept) if kept else 0
    print(f"| {name} | {n:,} | {statistics.median(wall['plain']):.2f} s | {over(wall)} | {over(cpu)} | "
          f"{over(main_cpu)} | {over(wall, 'plain2') if control else ''} | "
          f"{len(kept)} | {len(st.digests(run.id))} | {per / 1e3:.1f} kB | {raw / 1e3:.1f} kB | {per / raw:.2f}x |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3, help="pairs (plain, recorded), in ABBA order")
    p.add_argument("--steps", type=int, default=20000, help="iterations of the step-only loop")
    p.add_argument("--iters", type=int, default=1500, help="iterations of the while loop")
    p.add_argument("--only", default="step,while")
    p.add_argument("--control", action="store_true",
                   help="a second plain arm in every rep: the plain cell against itself, the noise floor")
    a = p.parse_args()
    torch.set_num_threads(1)
    from flor_nb import saver

    if saver.mode() == "process":  # in a script the saver starts with the first recording: start it untimed
        saver.current()
    print(f"# iteration loops: {a.reps} interleaved pairs, 1 torch thread, default overhead budget; "
          f"load average {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| workload | iterations | plain (median) | wall overhead (range) | process CPU overhead (range) "
          "| main-thread CPU overhead (range) | plain vs plain, wall (range) | checkpoints kept "
          "| digests | bytes written per kept checkpoint | model + optimizer state | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    if "step" in a.only:
        measure("step-only (makemore)", STEP_SETUP, STEP_TRAIN, "max_steps", a.steps, a.reps, a.control)
    if "while" in a.only:
        measure("while (nanoGPT)", WHILE_SETUP, WHILE_TRAIN, "max_iters", a.iters, a.reps, a.control)
    for line in notes:
        print(f"\n{line}")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}; command: {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
