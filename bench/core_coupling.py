"""Is a core that training leaves free really free? A one-thread training loop beside a small load.

The recorder counts its own CPU (writer thread, saver process) against training only when fewer than two
cores are free of torch's threads (``Recorder._cores_busy``). This measures why: the bench workload's
training cell with one torch thread, alone and beside a process that takes ``--duty`` of a core, either
spinning (pure CPU) or doing what the saver does (hash, write a 7 MB file, flush the folder). Arms are
interleaved, order reversed every other rep; the figure is the median per-rep ratio against "alone".

    .venv/bin/python bench/core_coupling.py [--reps 8] [--duty 0.1] [--scale 1.0]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import machine, spread  # noqa: E402
from workload import TRAIN, Config, namespace  # noqa: E402

LOAD = r'''
import os, sys, time, xxhash
kind, duty, folder = sys.argv[1], float(sys.argv[2]), sys.argv[3]
data = os.urandom(7 << 20)
while True:  # each second: `duty` seconds of CPU, then sleep
    t0, c0 = time.perf_counter(), time.process_time()
    while time.process_time() - c0 < duty:
        if kind == "write":
            xxhash.xxh3_128_hexdigest(data)
            path = os.path.join(folder, "blob")
            with open(path, "wb") as f:
                for i in range(0, len(data), 1 << 20):
                    f.write(data[i:i + (1 << 20)])
            fd = os.open(folder, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            os.unlink(path)
    time.sleep(max(0.0, 1.0 - (time.perf_counter() - t0)))
'''


def train(cfg: Config) -> float:
    ns = namespace(cfg)
    start = time.perf_counter()
    exec(compile(TRAIN, "<train>", "exec"), ns)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--duty", type=float, default=0.1, help="CPU seconds per second the load takes")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=3)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    cfg = Config(epochs=a.epochs, scale=a.scale, threads=1)
    print(f"`bench/core_coupling.py --reps {a.reps} --duty {a.duty} --scale {a.scale} --epochs {a.epochs}`; "
          f"{machine()}; {time.strftime('%Y-%m-%d %H:%M %Z')}\n")
    train(cfg)  # warm-up
    arms = ["alone", "spin", "write"]
    got: dict = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory(dir=HERE) as folder:
        script = os.path.join(folder, "load.py")
        with open(script, "w") as f:
            f.write(LOAD)
        for rep in range(a.reps):
            for arm in arms if rep % 2 == 0 else arms[::-1]:
                load = None
                if arm != "alone":
                    load = subprocess.Popen([sys.executable, script, arm, str(a.duty), folder])
                    time.sleep(0.5)
                try:
                    got[arm].append(train(cfg))
                finally:
                    if load is not None:
                        load.kill()
                        load.wait()
    print("| training beside | cell seconds, median | slower than alone, per rep: median (range) |\n|---|---|---|")
    for arm in arms:
        ratios = [x / y - 1 for x, y in zip(got[arm], got["alone"])]
        what = {"alone": "nothing", "spin": f"a spin loop, {a.duty:.0%} of a core",
                "write": f"hash + write + flush, {a.duty:.0%} of a core"}[arm]
        slower = "-" if arm == "alone" else f"{statistics.median(ratios):+.1%} ({spread(ratios, '{:+.1%}')})"
        print(f"| {what} | {statistics.median(got[arm]):.3f} | {slower} |")


if __name__ == "__main__":
    main()
