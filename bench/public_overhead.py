"""Record overhead on public code as a user sees it: pytorch/examples' MNIST, one real kernel, with and without
``%%flor record``.

The cells are ``mnist/main.py``'s, verbatim except for data and size (``public_ckpt_size.mnist``: random images
instead of MNIST, as in ``tests/test_public_code.py``), from the checkout named by ``FLOR_PYTORCH_EXAMPLES``; the
code stays out of this repository. One ipykernel with ``%load_ext flor_nb``; in each round the plain loop cell, the recorded one and the
plain one again (``bench/overhead.py``'s ``timed``: the setup cell re-run untimed before each, the kernel's CPU
accounted per thread), order reversed every other round. Per round: wall and main-thread CPU of each cell,
and the engine's accounting of the recorded one: its epochs summed, the run's duration, what lies outside its
epochs, the blocking snapshot time and the checkpoints kept.

    FLOR_PYTORCH_EXAMPLES=... .venv/bin/python bench/public_overhead.py [--rounds 8] [--epochs 6] [--images 1280]
        [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import against_both  # noqa: E402
from overhead import ACCOUNT, Kernel, describe, timed  # noqa: E402
from public_ckpt_size import mnist  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--images", type=int, default=1280, help="training images (1280: about 2 s per epoch here)")
    p.add_argument("--out", default=None, help="markdown file to write (and .json beside it)")
    a = p.parse_args()
    root = os.environ.get("FLOR_PYTORCH_EXAMPLES")
    if not root or not os.path.exists(os.path.join(root, "mnist", "main.py")):
        sys.exit("set FLOR_PYTORCH_EXAMPLES to a checkout of pytorch/examples (mnist/main.py)")
    cells, loop, _ = mnist(pathlib.Path(root), a.epochs, a.images, batch=64)
    defs, setup = cells[:3], cells[3]
    tmp = tempfile.mkdtemp(prefix="flor-public-overhead-")
    env = {**os.environ, "FLOR_NB_HOME": os.path.join(tmp, ".flor")}
    load0, started = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M %Z")
    kernel = Kernel(tmp, env)
    cells = {"plain": loop, "record": "%%flor record --name mnist --no-progress\n" + loop, "plain2": loop}
    rounds = []
    try:
        kernel.run("%load_ext flor_nb\nimport torch\ntorch.set_num_threads(1)\n" + ACCOUNT)
        for cell in defs:
            kernel.run(cell)
        time.sleep(15)  # the prestarted replay workers import torch: let them settle before timing
        timed(kernel, setup, cells["plain"], False)  # warm-up, not counted
        first = timed(kernel, setup, cells["record"], True)["engine"]  # the kernel's first recorded cell: reported
        first_outside = first["duration"] - sum(first["epochs"])
        arms = ("plain", "record", "plain2")
        for i in range(a.rounds):
            got = {arm: timed(kernel, setup, cells[arm], arm == "record") for arm in (arms if i % 2 == 0
                                                                                      else arms[::-1])}
            e = got["record"]["engine"]
            print(f"round {i}: plain {got['plain']['wall']:.2f} s, recorded {got['record']['wall']:.2f} s, "
                  f"plain again {got['plain2']['wall']:.2f} s; outside the epochs "
                  f"{e['duration'] - sum(e['epochs']):.3f} s", flush=True)
            rounds.append(got)
    finally:
        kernel.close()
    load1 = os.getloadavg()
    wall = {arm: [r[arm]["wall"] for r in rounds] for arm in ("plain", "record", "plain2")}
    main_cpu = {arm: [r[arm]["main"] for r in rounds] for arm in ("plain", "record", "plain2")}
    eng = [r["record"]["engine"] for r in rounds]
    outside = [e["duration"] - sum(e["epochs"]) for e in eng]
    snapshot = [sum(e["snapshot"]) if isinstance(e["snapshot"], list) else e["snapshot"] for e in eng]
    ms = lambda x: f"{x * 1e3:.0f} ms"  # noqa: E731
    s = lambda x: f"{x:.2f} s"  # noqa: E731
    pct = lambda x: f"{x:+.2%}"  # noqa: E731
    lines = [
        "# Record overhead on pytorch/examples' MNIST in one real kernel (bench/public_overhead.py)",
        "",
        f"`FLOR_PYTORCH_EXAMPLES=... .venv/bin/python bench/public_overhead.py --rounds {a.rounds} --epochs "
        f"{a.epochs} --images {a.images}`; {started}; 2 cores, one torch thread; load "
        f"{load0[0]:.2f} at the start, {load1[0]:.2f} at the end. Medians (IQR, range).",
        "",
        "| measure | result |",
        "|---|---|",
        f"| plain cell, wall | {describe(wall['plain'], s)} |",
        f"| recorded cell, wall | {describe(wall['record'], s)} |",
        f"| recorded against the mean of both plain cells, wall: mean (s.e.) | "
        f"{against_both(wall['record'], wall['plain'], wall['plain2'])} |",
        f"| recorded against the mean of both plain cells, main-thread CPU: mean (s.e.) | "
        f"{against_both(main_cpu['record'], main_cpu['plain'], main_cpu['plain2'])} |",
        f"| recorded / plain - 1 per round, wall | "
        f"{describe([r / q - 1 for r, q in zip(wall['record'], wall['plain'])], pct)} |",
        f"| recorded cell outside its epochs (run duration - epochs summed) | {describe(outside, ms)} |",
        f"| ... as a share of the recorded cell's wall | "
        f"{describe([o / w for o, w in zip(outside, wall['record'])], pct)} |",
        f"| the kernel's first recorded cell (warm-up, not in the other rows), outside its epochs | "
        f"{ms(first_outside)} |",
        f"| blocking snapshot time per recorded cell | {describe(snapshot, ms)} |",
        f"| checkpoints kept per recorded cell | {describe([e['checkpoints'] for e in eng], str)} |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump({"args": vars(a), "started": started, "rounds": rounds}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
