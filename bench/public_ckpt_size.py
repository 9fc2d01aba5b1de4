"""Bytes per kept checkpoint / the model + optimizer state, on public training code kept verbatim but for data and
size (the checkouts the public-code tests read; public code stays out of this repository):

* ``FLOR_PYTORCH_EXAMPLES``: pytorch/examples' ``mnist/main.py`` (Adadelta; the batch loop in ``train()``);
* ``FLOR_PYTORCH_TUTORIALS``: pytorch/tutorials' ``beginner_source/blitz/cifar10_tutorial.py`` (SGD with momentum;
  the batch loop in the cell).

Each is recorded in this process with ``overhead=inf`` (a checkpoint every epoch); a checkpoint's bytes are
what it added to the store (``flor_nb.checkpoints``: after dedup).

    .venv/bin/python bench/public_ckpt_size.py [--epochs 12] [--out bench/results-public-ckpt.md]
"""
from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import tempfile
import textwrap

import torch

import flor_nb as flor
from flor_nb.state import tensor_bytes
from flor_nb.store import Store


def _between(src: str, start: str, end: str) -> str:
    i = src.index(start)
    return src[i:src.index(end, i)]


def mnist(root: pathlib.Path, epochs: int, images: int = 320, batch: int = 32):
    """(cells: imports, Net, the helpers, the setup; the epoch loop; what to size) of ``mnist/main.py``, sized, with
    ``images`` random training images instead of MNIST (also bench/public_overhead.py's cells)."""
    src = (root / "mnist" / "main.py").read_text()
    imports = _between(src, "import argparse", "class Net").replace("from torchvision import datasets, transforms\n", "")
    setup = textwrap.dedent(_between(src, "    # Training settings", "    for epoch in range(1, args.epochs + 1):"))
    setup = setup.replace("args = parser.parse_args()", f"args = parser.parse_args(['--epochs', '{epochs}', "
                          f"'--batch-size', '{batch}', '--log-interval', '1000'])")
    setup = setup.replace(_between(setup, "transform=transforms.Compose", "train_loader = torch"), textwrap.dedent(f"""\
        dataset1 = torch.utils.data.TensorDataset(torch.randn({images}, 1, 28, 28), torch.randint(0, 10, ({images},)))
        dataset2 = torch.utils.data.TensorDataset(torch.randn(200, 1, 28, 28), torch.randint(0, 10, (200,)))
        """))
    cells = [imports, _between(src, "class Net", "def train("), _between(src, "def train(", "def main():"), setup]
    loop = textwrap.dedent(_between(src, "    for epoch in range(1, args.epochs + 1):", "\n    if args.save_model"))
    return cells, loop, ("model", "optimizer")


def cifar(root: pathlib.Path, epochs: int):
    src = (root / "beginner_source" / "blitz" / "cifar10_tutorial.py").read_text()
    data = textwrap.dedent("""\
        import torch
        torch.manual_seed(0)
        trainset = torch.utils.data.TensorDataset(torch.randn(480, 3, 32, 32).clamp(-1, 1), torch.randint(0, 10, (480,)))
        trainloader = torch.utils.data.DataLoader(trainset, batch_size=4, shuffle=True, num_workers=0)
        """)
    cells = [data, _between(src, "import torch.nn as nn", "#####"), _between(src, "import torch.optim as optim", "#####")]
    loop = _between(src, "for epoch in range(2):", "print('Finished Training')").replace(
        "range(2)", f"range({epochs})").replace("2000", "40").replace("1999", "39")
    return cells, loop, ("net", "optimizer")


def measure(name, cells, loop, roots) -> dict:
    ns = {"flor": flor, "__name__": "__main__"}
    for c in cells:
        exec(c, ns)
    store = Store(tempfile.mkdtemp(prefix="flor-bench-"))
    run = flor.record(loop, name=name, namespace=ns, cells=cells, store=store, overhead=float("inf"), progress=False)
    model, opt = (ns[r] for r in roots)
    raw = tensor_bytes(model.state_dict()) + tensor_bytes(opt.state_dict()["state"])
    ck = flor.checkpoints(name, store=store)
    kept = [int(b) for b in ck[ck["epoch"] >= 0]["bytes"]]
    return {"name": name, "raw": raw, "ratios": [b / raw for b in kept], "whole_every": run.state.get("whole_every"),
            "omitting": run.state.get("omitting") or []}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for var, what, build in (("FLOR_PYTORCH_EXAMPLES", "pytorch/examples mnist/main.py", mnist),
                             ("FLOR_PYTORCH_TUTORIALS", "pytorch/tutorials cifar10_tutorial.py", cifar)):
        root = os.environ.get(var)
        if not root:
            print(f"skipped {what}: set {var} to a checkout")
            continue
        r = measure(build.__name__, *build(pathlib.Path(root), a.epochs))
        ratios = r["ratios"]
        lean = [x for x in ratios if x < 1.1]
        rows.append(f"| {what} | {r['raw'] / 1e6:.2f} MB | {len(ratios)} | {r['whole_every']} | "
                    f"{len(lean)}: {min(lean):.3f}x-{max(lean):.3f}x | {max(ratios):.3f}x | "
                    f"{sum(ratios) / len(ratios):.3f}x |")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([
        f"# Bytes per kept checkpoint on public code; {when}, {platform.node()}, load {os.getloadavg()[0]:.2f}", "",
        f"command: `bench/public_ckpt_size.py --epochs {a.epochs}`", "",
        "| code | model + optimizer state | checkpoints | k (every k-th keeps all) | leaving gradients out | "
        "keeping everything | mean |",
        "|---|---|---|---|---|---|---|", *rows, ""])
    print(text)
    if a.out:
        pathlib.Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
