"""GPU figures for issue 11: record overhead on CUDA, snapshot blocking ms per GB, GPU memory overhead.

* **record overhead**: a CNN with dropout trained with AMP on CUDA, plain (``flor`` a no-op) and recorded
  (default budget, and a checkpoint every epoch), in alternating order (ABBA); median and range.
* **snapshot blocking**: :meth:`Capturer.snapshot` of a model + Adam state of about ``--gb`` GB on the GPU
  into the pinned pool: the time the training thread is blocked (the copies themselves run on a side
  stream; the writer waits for them), per GB, the first snapshot (pinned buffers allocated) and later
  ones (reused) apart; and the time until the copies have landed, per GB.
* **GPU memory overhead**: ``torch.cuda.max_memory_allocated`` during snapshots, minus before.
* **flor.deterministic() cost**: the same plain training with and without the recipe.

Without CUDA it says so and exits 0. Not yet run on a GPU (none was available to this issue).

    .venv/bin/python bench/gpu.py [--reps 3] [--epochs 6] [--n 8192] [--gb 1.0] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SETUP = '''
import torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
device = "cuda"
X = torch.randn(N, 3, 32, 32, device=device); y = torch.randint(0, 10, (N,), device=device)
model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Linear(128 * 8 * 8, 1024), nn.ReLU(), nn.Dropout(0.3),
                      nn.Linear(1024, 10)).to(device)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
scaler = torch.amp.GradScaler("cuda")
'''
TRAIN = '''
for epoch in range(EPOCHS):
    model.train()
    perm = torch.randperm(X.shape[0], device=device)
    for i in range(0, X.shape[0], 128):
        idx = perm[i:i + 128]
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        flor.log("loss", loss.item())
'''


class _NoFlor:
    @staticmethod
    def log(name, value):
        return value


N = 8192  # examples per epoch (--n)


def _plain(epochs):
    ns = {"flor": _NoFlor, "EPOCHS": epochs, "N": N}
    exec(SETUP, ns)
    torch.cuda.synchronize()
    t = time.perf_counter()
    exec(TRAIN, ns)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def _recorded(epochs, overhead, home):
    import flor_nb as flor

    ns = {"flor": flor, "EPOCHS": epochs, "N": N}
    exec(SETUP, ns)
    torch.cuda.synchronize()
    t = time.perf_counter()
    run = flor.record(TRAIN, name="gpu", namespace=ns, cells=[f"EPOCHS = {epochs}\nN = {N}\n{SETUP}"],
                      store=flor.get_store(home), overhead=overhead, progress=False)
    torch.cuda.synchronize()
    return time.perf_counter() - t, run


def _spread(xs):
    return f"{statistics.median(xs):.3f} (range {min(xs):.3f}-{max(xs):.3f}, n={len(xs)})"


def record_overhead(reps, epochs):
    plain, budget, every = [], [], []
    for r in range(reps):
        order = ["plain", "budget", "every"] if r % 2 == 0 else ["every", "budget", "plain"]
        for what in order:
            with tempfile.TemporaryDirectory() as home:
                if what == "plain":
                    plain.append(_plain(epochs))
                else:
                    s, _ = _recorded(epochs, 0.02 if what == "budget" else float("inf"), home)
                    (budget if what == "budget" else every).append(s)
    p = statistics.median(plain)
    return {"plain_s": plain, "budget_s": budget, "every_epoch_s": every,
            "overhead_budget": statistics.median(budget) / p - 1,
            "overhead_every_epoch": statistics.median(every) / p - 1}


def snapshot_cost(gb, reps):
    from flor_nb import state

    width = 4096
    layers = max(1, int(gb * 2 ** 30 / (3 * width * width * 4)))  # weights + Adam's two moments, fp32
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)]).cuda()
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(2, width, device="cuda")).sum().backward()
    opt.step()
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    nbytes += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    nbytes += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    ns = {"__name__": "__main__", "model": model, "opt": opt}
    cap = state.Capturer(ns, state.Scope(assigned={"model", "opt"}, free=set()))
    pool = state.BufferPool()
    blocking, landed, first = [], [], None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for r in range(reps + 1):
        t = time.perf_counter()
        snap = cap.snapshot(pool=pool)
        b = time.perf_counter() - t
        state.wait_copies(snap)
        done = time.perf_counter() - t
        if r == 0:
            first = b
        else:
            blocking.append(b)
            landed.append(done)
        pool.release(snap)
    gbs = nbytes / 2 ** 30
    return {"state_gb": gbs, "first_blocking_ms_per_gb": first * 1e3 / gbs,
            "blocking_ms_per_gb": [x * 1e3 / gbs for x in blocking],
            "landed_ms_per_gb": [x * 1e3 / gbs for x in landed],
            "gpu_memory_overhead_mb": (torch.cuda.max_memory_allocated() - base) / 2 ** 20}


def deterministic_cost(reps, epochs):
    import flor_nb as flor
    from flor_nb import devices

    off, on = [], []
    before = devices.flags()
    for r in range(reps):
        for what in (["off", "on"] if r % 2 == 0 else ["on", "off"]):
            if what == "on":
                flor.deterministic(warn_only=True)
            else:
                devices.apply_flags(before)
            (on if what == "on" else off).append(_plain(epochs))
    devices.apply_flags(before)
    return {"off_s": off, "on_s": on, "cost": statistics.median(on) / statistics.median(off) - 1}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--n", type=int, default=N, help="examples per epoch (default %(default)s)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    globals()["N"] = a.n
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU here; nothing measured.")
        return 0
    out = {"gpu": torch.cuda.get_device_name(torch.cuda.current_device()), "torch": torch.__version__}
    _plain(1)  # warm up: CUDA context, cuDNN, allocator
    out["record"] = record_overhead(a.reps, a.epochs)
    out["snapshot"] = snapshot_cost(a.gb, a.reps)
    out["deterministic"] = deterministic_cost(a.reps, a.epochs)
    r, s, d = out["record"], out["snapshot"], out["deterministic"]
    print(f"GPU: {out['gpu']}, torch {out['torch']}")
    print(f"record overhead, default budget: {r['overhead_budget']:+.1%}; checkpoint every epoch: "
          f"{r['overhead_every_epoch']:+.1%} (plain {_spread(r['plain_s'])} s)")
    print(f"snapshot of {s['state_gb']:.2f} GB: blocking {_spread(s['blocking_ms_per_gb'])} ms/GB (first, pinned "
          f"buffers allocated: {s['first_blocking_ms_per_gb']:.1f} ms/GB); copies landed after "
          f"{_spread(s['landed_ms_per_gb'])} ms/GB; GPU memory overhead {s['gpu_memory_overhead_mb']:.1f} MB")
    print(f"flor.deterministic(): {d['cost']:+.1%} training time ({_spread(d['off_s'])} s without)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
