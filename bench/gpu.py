"""GPU figures for issue 11: record overhead on CUDA, snapshot blocking ms per GB, GPU memory overhead.

* **digest cost**: the training thread's blocking time for one state digest (a unit that gets no
  checkpoint) of the bench's model + Adam on the GPU, hashed through the pinned staging buffer and, as
  before it, through a fresh ``.cpu()`` copy; interleaved.
* **record overhead**: a CNN with dropout trained with AMP on CUDA, plain (``flor`` a no-op) and recorded
  (default budget; a checkpoint every epoch, written by the saver process; the same, written by the
  kernel's writer thread), the order reversed every other repetition; median and range, and the engine's
  own accounting of each arm.
* **snapshot blocking**: :meth:`Capturer.snapshot` of a model + Adam state of about ``--gb`` GB on the GPU
  into the pinned pool: the time the training thread is blocked (the copies themselves run on a side
  stream; the writer waits for them), per GB, the first snapshot (pinned buffers allocated) and later
  ones (reused) apart; and the time until the copies have landed, per GB.
* **GPU memory overhead**: ``torch.cuda.max_memory_allocated`` during snapshots, minus before.
* **flor.deterministic() cost**: the same plain training with and without the recipe.

Without CUDA it says so and exits 0. Figures: bench/results-gpu.md.

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
sys.path.insert(0, HERE)

from common import interleaved  # noqa: E402

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


ARMS = {"budget": 0.02, "every": float("inf"), "every_thread": float("inf"), "budget_unstaged": 0.02}
ARM_NAMES = ("budget", "every", "every_thread")  # measured by default


def _engine(run) -> dict:
    """The engine's own accounting of one recorded cell (training-thread blocking, writer time)."""
    t = run.timings or {}
    return {"epochs_s": t.get("epoch_seconds"), "checkpoints": len(t.get("snapshot_seconds") or []),
            "snapshot_s": sum(t.get("snapshot_seconds") or []), "digests": len(t.get("digest_seconds") or []),
            "digest_s": sum(t.get("digest_seconds") or []), "writer_s": t.get("writer_seconds"),
            "writer_cpu_s": t.get("writer_cpu_seconds"), "commit_s": sum(t.get("commit_seconds") or []),
            "saver": t.get("saver"), "close_wait_s": t.get("close_wait"), "start_wait_s": t.get("start_checkpoint_wait")}


def record_overhead(reps, epochs, arms=ARM_NAMES):
    """Plain vs recorded arms, their order reversed every other repetition. ``every_thread``: a checkpoint every
    epoch written by the kernel's writer thread (``FLOR_NB_SAVER=thread``) instead of the saver process.
    ``budget_unstaged``: the default budget with GPU tensors digested through a fresh .cpu() copy (before the
    pinned staging buffer)."""
    from flor_nb import tensor_bytes

    times = {a: [] for a in ("plain", *arms)}
    engine = {a: [] for a in arms}
    for _, what in interleaved(reps, list(times)):
        if what == "plain":
            times["plain"].append(_plain(epochs))
            continue
        tensor_bytes.STAGED = what != "budget_unstaged"
        os.environ["FLOR_NB_SAVER"] = "thread" if what.endswith("_thread") else "process"
        try:
            with tempfile.TemporaryDirectory() as home:
                s, run = _recorded(epochs, ARMS[what], home)
        finally:
            tensor_bytes.STAGED = True
            os.environ.pop("FLOR_NB_SAVER")
        times[what].append(s)
        engine[what].append({**_engine(run), "outside_epochs_s": s - sum(run.timings.get("epoch_seconds") or [])})
    p = statistics.median(times["plain"])
    return {"seconds": times, "engine": engine,
            "overhead": {a: statistics.median(times[a]) / p - 1 for a in arms}}


def digest_cost(reps):
    """Blocking ms of one state digest (a unit without a checkpoint) of the bench's model + Adam on the GPU:
    staged through the pinned buffer vs a fresh .cpu() copy, interleaved."""
    from flor_nb import state, tensor_bytes

    ns = {"flor": _NoFlor, "EPOCHS": 1, "N": N, "__name__": "__main__"}
    exec(SETUP, ns)
    exec(TRAIN, ns)
    cap = state.Capturer(ns, state.Scope(assigned={"model", "opt", "scaler"}, free=set()))
    out = {"staged_ms": [], "unstaged_ms": []}
    digests = {}
    for r in range(reps + 1):
        for staged in ((True, False) if r % 2 == 0 else (False, True)):
            tensor_bytes.STAGED = staged
            torch.cuda.synchronize()
            t = time.perf_counter()
            d = cap.digests()
            ms = (time.perf_counter() - t) * 1e3
            if r:  # the first round warms up (the pinned buffer is allocated once)
                out["staged_ms" if staged else "unstaged_ms"].append(ms)
            digests[staged] = d
    tensor_bytes.STAGED = True
    out["equal"] = digests[True] == digests[False]
    out["state_mb"] = sum(t.numel() * t.element_size() for t in ns["model"].state_dict().values()) * 4 / 2 ** 20
    return out


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
    ap.add_argument("--skip-deterministic", action="store_true", help="do not measure flor.deterministic()'s cost")
    ap.add_argument("--long", type=int, default=0, metavar="EPOCHS",
                    help="also: plain vs a checkpoint every epoch over this many epochs, 2 repetitions")
    a = ap.parse_args()
    globals()["N"] = a.n
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU here; nothing measured.")
        return 0
    out = {"gpu": torch.cuda.get_device_name(torch.cuda.current_device()), "torch": torch.__version__}
    _plain(1)  # warm up: CUDA context, cuDNN, allocator
    out["digest"] = digest_cost(max(3, a.reps))
    out["record"] = record_overhead(a.reps, a.epochs)
    if a.long:
        out["record_long"] = record_overhead(2, a.long, arms=("every",))
    out["snapshot"] = snapshot_cost(a.gb, a.reps)
    if not a.skip_deterministic:
        out["deterministic"] = deterministic_cost(a.reps, a.epochs)
    r, s, g = out["record"], out["snapshot"], out["digest"]
    print(f"GPU: {out['gpu']}, torch {out['torch']}")
    print(f"one digest of model + Adam (~{g['state_mb']:.0f} MB): staged {_spread(g['staged_ms'])} ms, fresh .cpu() "
          f"{_spread(g['unstaged_ms'])} ms; same digests: {g['equal']}")
    print(f"record overhead vs plain {_spread(r['seconds']['plain'])} s: " + "; ".join(
        f"{a} {v:+.1%} ({_spread(r['seconds'][a])} s)" for a, v in r["overhead"].items()))
    for arm, runs in r["engine"].items():
        e = runs[len(runs) // 2]
        print(f"  engine, {arm} (middle rep): {e['checkpoints']} checkpoints blocking {e['snapshot_s']*1e3:.0f} ms, "
              f"{e['digests']} digests blocking {e['digest_s']*1e3:.0f} ms, commits {e['commit_s']*1e3:.0f} ms, "
              f"writer {e['writer_s']:.2f} s ({e['writer_cpu_s']:.2f} s CPU); saver process wrote "
              f"{(e['saver'] or {}).get('process')} ({(e['saver'] or {}).get('why_not') or 'all it could'}); "
              f"outside the epochs {e['outside_epochs_s']*1e3:.0f} ms, of it waiting for the first write "
              f"{(e['start_wait_s'] or 0)*1e3:.0f} ms and for the last writes at the end {(e['close_wait_s'] or 0)*1e3:.0f} "
              f"ms; epochs "
              f"{[round(x, 3) for x in e['epochs_s'] or []]}")
    if "record_long" in out:
        r = out["record_long"]
        print(f"over {a.long} epochs: plain {_spread(r['seconds']['plain'])} s, a checkpoint every epoch "
              f"{r['overhead']['every']:+.1%} ({_spread(r['seconds']['every'])} s); outside the epochs "
              f"{[round(e['outside_epochs_s'], 3) for e in r['engine']['every']]} s")
    print(f"snapshot of {s['state_gb']:.2f} GB: blocking {_spread(s['blocking_ms_per_gb'])} ms/GB (first, pinned "
          f"buffers allocated: {s['first_blocking_ms_per_gb']:.1f} ms/GB); copies landed after "
          f"{_spread(s['landed_ms_per_gb'])} ms/GB; GPU memory overhead {s['gpu_memory_overhead_mb']:.1f} MB")
    if "deterministic" in out:
        d = out["deterministic"]
        print(f"flor.deterministic(): {d['cost']:+.1%} training time ({_spread(d['off_s'])} s without)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
