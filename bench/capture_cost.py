"""What capturing and verifying state costs the training thread: this engine against an earlier revision.

Records the bench workload with each engine, in alternating order, each in a fresh
process (``PYTHONPATH`` points at an export of the baseline revision for the old
one), and reads the engine's own accounting: time the training thread spends per
checkpoint (walking and copying the state, waiting for the writer) and per digest
(epochs without a checkpoint), against the median epoch time. Wall time of the
whole recorded cell is printed beside it, but on a shared 2-core machine its noise
is larger than the effect; the blocking share is what this measures.

    .venv/bin/python bench/capture_cost.py --baseline 062a8e8 --reps 4 --epochs 8
    .venv/bin/python bench/capture_cost.py --micro   # the capture alone, old and new interleaved in one process

``--micro`` times, on the training thread's CPU clock (less sensitive to other load than wall time), one
snapshot of the bench workload's state by the baseline's ``state.capture`` and by this engine's
``Capturer.snapshot`` (into reused buffers, as when recording), and this engine's digest (taken at epochs
without a checkpoint), interleaved, and relates them to one plain training epoch.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

RUNNER = r'''
import json, sys, time, tempfile
sys.path.insert(0, {bench!r})
import torch
torch.set_num_threads(1)
import flor_nb
from workload import TRAIN, Config, namespace, setup_code
cfg = Config(epochs={epochs}, scale={scale}, threads=1)
ns = namespace(cfg, flor=flor_nb)
t = time.perf_counter()
run = flor_nb.record(TRAIN, name="cost", namespace=ns, cells=[setup_code(cfg)], store=tempfile.mkdtemp(),
                     overhead={overhead})
wall = time.perf_counter() - t
tm = run.timings
print(json.dumps({{"wall": wall, "epoch": tm["epoch_seconds"], "snapshot": tm["snapshot_seconds"],
                  "digest": tm.get("digest_seconds", []), "file": flor_nb.__file__}}))
'''


def export(rev: str) -> Path:
    out = Path(tempfile.mkdtemp(prefix=f"flor-{rev}-"))
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "flor_nb"], check=True, capture_output=True).stdout
    tarfile.open(fileobj=__import__("io").BytesIO(data)).extractall(out)
    return out


def once(path: Path, epochs: int, scale: float, overhead: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(path), "OMP_NUM_THREADS": "1"}
    code = RUNNER.format(bench=str(HERE), epochs=epochs, scale=scale, overhead=overhead)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=tempfile.gettempdir()).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["file"].startswith(str(path)), r["file"]
    return r


def micro(rev: str, n: int = 300):
    import importlib.util
    import time

    sys.path.insert(0, str(HERE))
    import torch

    torch.set_num_threads(1)
    import flor_nb
    from flor_nb import cells, state
    from workload import TRAIN, Config, namespace

    path = export(rev) / "flor_nb" / "state.py"
    spec = importlib.util.spec_from_file_location("flor_old_state", path)
    old = importlib.util.module_from_spec(spec)
    sys.modules["flor_old_state"] = old  # dataclasses look their module up
    spec.loader.exec_module(old)  # the 0.1 state module imports nothing of flor_nb
    cfg = Config(epochs=1, scale=1.0, threads=1)
    ns = namespace(cfg, flor=flor_nb)
    one = TRAIN.replace("range(EPOCHS)", "range(1)")
    t = time.perf_counter()
    exec(one.replace("flor.log", "(lambda *a: None)"), ns)  # one plain epoch: the state as it is mid-run
    epoch = time.perf_counter() - t
    free, assigned = cells.analyze(TRAIN)
    old_scope, new_scope = old.Scope(assigned=assigned, free=free), state.Scope(assigned=assigned, free=free)
    old_pool, new_pool = old.BufferPool(), state.BufferPool()
    cap = state.Capturer(ns, new_scope)
    times = {"baseline snapshot": [], "this snapshot": [], "this digest": []}
    for i in range(n):
        for name in (sorted(times) if i % 2 else sorted(times, reverse=True)):
            t = time.thread_time()
            if name == "baseline snapshot":
                old_pool.release(old.capture(ns, old_scope, pool=old_pool))
            elif name == "this snapshot":
                new_pool.release(cap.snapshot(pool=new_pool))
            else:
                cap.digests()
            times[name].append(time.thread_time() - t)
    print(f"# capture alone: {n} interleaved repetitions, training-thread CPU time, bench workload scale 1.0, "
          f"1 torch thread; one plain epoch took {epoch * 1e3:.0f} ms; load average {os.getloadavg()[0]:.2f}\n")
    print("| what | median | IQR | share of one epoch |")
    print("|---|---|---|---|")
    for name, xs in times.items():
        q = statistics.quantiles(xs, n=4)
        print(f"| {name} | {statistics.median(xs) * 1e3:.2f} ms | {q[0] * 1e3:.2f}-{q[2] * 1e3:.2f} ms | "
              f"{statistics.median(xs) / epoch:.2%} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--micro", action="store_true", help="time the capture alone, old and new interleaved")
    p.add_argument("--baseline", default="062a8e8", help="git revision to compare with")
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--scale", type=float, default=1.0)
    a = p.parse_args()
    if a.micro:
        return micro(a.baseline)
    engines = {"baseline": export(a.baseline), "this": ROOT}  # run from a temp dir: the cwd would shadow PYTHONPATH
    policies = {"every epoch": 1e9, "default (2% budget)": 0.02}
    results = {(e, pol): [] for e in engines for pol in policies}
    for rep in range(a.reps):
        order = list(engines) if rep % 2 == 0 else list(reversed(engines))  # ABBA
        for pol, budget in policies.items():
            for e in order:
                results[(e, pol)].append(once(engines[e], a.epochs, a.scale, budget))
    load = os.getloadavg()[0]
    print(f"# capture cost: {a.reps} reps x {a.epochs} epochs, scale {a.scale}, 1 torch thread, "
          f"baseline {a.baseline}, load average at end {load:.2f}\n")
    print("| engine | policy | epoch (median) | blocking per checkpoint | checkpoints/epoch | digest per epoch "
          "| digests/epoch | blocking share of epoch time | cell wall time (median) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (e, pol), rs in results.items():
        epoch = statistics.median(x for r in rs for x in r["epoch"])
        snaps = [x for r in rs for x in r["snapshot"]]
        digs = [x for r in rs for x in r["digest"]]
        n_ep = sum(len(r["epoch"]) for r in rs)
        share = (sum(snaps) + sum(digs)) / sum(x for r in rs for x in r["epoch"])
        print(f"| {e} | {pol} | {epoch * 1e3:.0f} ms | {statistics.median(snaps) * 1e3:.2f} ms | "
              f"{len(snaps) / n_ep:.2f} | {(statistics.median(digs) * 1e3) if digs else 0:.2f} ms | "
              f"{len(digs) / n_ep:.2f} | {share:.2%} | {statistics.median(r['wall'] for r in rs):.2f} s |")


if __name__ == "__main__":
    main()
