"""How long the training thread cannot run while a checkpoint is persisted (issue 12: the writer's GIL share).

A GPU training loop is bound by Python launching kernels; the stand-in here is a pure-Python spin that
sums its own gaps over 0.1 ms (time it could not run). Three measurements, interleaved:

* **plain**: the spin alone, 0.5 s per epoch;
* **recorded**: the same cell under ``flor.record`` with a checkpoint every epoch (the state: an MLP and
  Adam, changed every epoch so every checkpoint writes new blobs), twice: checkpoints persisted by the
  kernel's writer thread (``FLOR_NB_SAVER=thread``) and by the saver process (the default);
* **the same file work in a thread vs a process**: files of the recording's blob sizes, hashed, written,
  renamed and synced every 0.5 s by a background thread, then by a background process. The difference is
  what persisting from a separate process (REFT's saver) can remove at best.

    .venv/bin/python bench/gil_stalls.py [--width 600] [--epochs 8] [--reps 3]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SPIN = 0.5
STALL = 1e-4


def spin(seconds: float) -> float:
    """Run Python for ``seconds``; return the time the thread could not run (gaps over 0.1 ms)."""
    t0 = last = time.perf_counter()
    lost = 0.0
    while True:
        now = time.perf_counter()
        if now - last > STALL:
            lost += now - last
        last = now
        if now - t0 > seconds:
            return lost


SETUP = '''
import torch, torch.nn as nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(W, W), nn.ReLU(), nn.Linear(W, W), nn.ReLU(), nn.Linear(W, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
model(torch.ones(2, W)).sum().backward(); opt.step()
lost = []
'''
TRAIN = '''
for epoch in range(EPOCHS):
    with torch.no_grad():
        torch._foreach_add_(list(model.parameters()), 1e-3)
    lost.append(spin(SPIN))
'''


class _NoFlor:
    @staticmethod
    def log(name, value):
        return value


def _cell(arm: str, width: int, epochs: int) -> tuple[list, dict | None]:
    """One cell: ``plain``, or recorded with checkpoints written by the writer ``thread`` or the saver ``process``."""
    import flor_nb as flor
    from flor_nb import checkpoint

    recorded = arm != "plain"
    os.environ["FLOR_NB_SAVER"] = arm if recorded else "process"

    ns = {"flor": flor if recorded else _NoFlor, "EPOCHS": epochs, "W": width, "SPIN": SPIN, "spin": spin,
          "__name__": "__main__"}
    exec(SETUP, ns)
    if not recorded:
        exec(TRAIN, ns)
        return ns["lost"][1:], None
    with tempfile.TemporaryDirectory(dir=os.getcwd()) as home:
        run = flor.record(TRAIN, name="stalls", namespace=ns, store=flor.get_store(home), progress=False,
                          cells=[f"EPOCHS = {epochs}\nW = {width}\nSPIN = {SPIN}\n{SETUP}"], overhead=float("inf"))
        st = flor.get_store(home)
        last = st.checkpoints(run.id)[-1]["path"]
        sizes = [checkpoint.blob_path(home, h).stat().st_size for h in checkpoint.references(home, last)]
    assert run.timings["saver"]["process"] == (len(run.timings["snapshot_seconds"]) if arm == "process" else 0), \
        run.timings["saver"]
    return ns["lost"][1:], {"timings": run.timings, "blob_sizes": sizes}  # epoch 0 follows the start checkpoint


def _file_work(stop, folder, sizes):
    import xxhash

    data = [os.urandom(s) for s in sizes]
    k = 0
    while not stop.is_set():
        t = time.perf_counter()
        for j, d in enumerate(data):
            xxhash.xxh3_128_hexdigest(d)
            p = os.path.join(folder, f"{k}-{j}")
            with open(p + ".tmp", "wb") as f:
                f.write(d)
            os.replace(p + ".tmp", p)
        os.sync()
        for j in range(len(data)):
            os.unlink(os.path.join(folder, f"{k}-{j}"))
        k += 1
        time.sleep(max(0.0, SPIN - (time.perf_counter() - t)))


def _background(kind: str, sizes, seconds: float) -> float:
    with tempfile.TemporaryDirectory(dir=os.getcwd()) as folder:
        stop = threading.Event() if kind == "thread" else mp.Event()
        worker = (threading.Thread if kind == "thread" else mp.Process)(target=_file_work, args=(stop, folder, sizes))
        worker.start()
        time.sleep(0.3)
        lost = [spin(SPIN) for _ in range(int(seconds / SPIN))]
        stop.set()
        worker.join()
    return statistics.median(lost)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=600, help="MLP width: 600 gives about 11 MB of model + Adam state")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from bench.common import interleaved

    arms = ("plain", "thread", "process")
    lost = {a: [] for a in arms + ("file work in a thread", "file work in a process")}
    writer_cpu = {"thread": [], "process": []}
    sizes = None
    _cell("process", a.width, 2)  # warm-up: the forkserver the saver forks from starts once per process
    for r, arm in interleaved(a.reps, list(arms)):
        stalls, info = _cell(arm, a.width, a.epochs)
        lost[arm].append(statistics.median(stalls))
        if info:
            sizes = info["blob_sizes"]
            t = info["timings"]
            cpu = t["writer_cpu_seconds"] + t["saver"]["cpu_seconds"]
            writer_cpu[arm].append(cpu / max(1, len(t["snapshot_seconds"])))
        if arm != arms[-1 if r % 2 == 0 else 0]:
            continue  # the file-work stand-ins run once a repetition, after its last cell
        for kind in ("thread", "process"):
            lost[f"file work in a {kind}"].append(_background(kind, sizes, SPIN * a.epochs))
    ms = lambda xs: f"{statistics.median(xs) * 1e3:.1f} ms (range {min(xs) * 1e3:.1f}-{max(xs) * 1e3:.1f})"  # noqa: E731
    print(f"training-thread stalls per {SPIN} s epoch, {a.reps} reps, state of width {a.width} "
          f"({sum(sizes) / 2 ** 20:.1f} MB in {len(sizes)} blob files a checkpoint):")
    print(f"  plain:                                            {ms(lost['plain'])}")
    for arm in ("thread", "process"):
        print(f"  recorded, a checkpoint every epoch, {arm:7s} saver: {ms(lost[arm])}; writer CPU "
              f"{statistics.median(writer_cpu[arm]) * 1e3:.0f} ms a checkpoint (the saver's included)")
    print(f"  the blob files' work in a thread:                 {ms(lost['file work in a thread'])}")
    print(f"  the same work in a separate process:              {ms(lost['file work in a process'])}")

if __name__ == "__main__":
    sys.exit(main())
