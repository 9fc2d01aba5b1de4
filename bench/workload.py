"""The shared benchmark workload: a small CNN on scikit-learn's bundled digits.

Everything a benchmark runs is notebook-cell text: ``setup_code(cfg)`` is the
cell that builds data, model, optimizer, scheduler and helpers; ``TRAIN`` is the
training cell (its first top-level ``for`` is the epoch loop, the first nested
``for`` the step loop). The same text runs

* recorded by flor_nb (``flor_nb.record(TRAIN, namespace=ns, cells=[setup])``),
* plainly, with ``flor`` bound to :class:`NoFlor` (``log`` returns its value):
  the baseline without any recording machinery, and
* under FlorDB (``bench/flordb/train_flordb.py`` wraps the loops in
  ``flor.loop`` and adds the ``torch.save`` FlorDB relies on).

This module imports only the standard library at import time, so the FlorDB
virtual environment (which has no flor_nb) can import it too.

Size: ``scale=1.0`` trains on 1500 digits upsampled to 16x16, batch 32 (47
steps), about 1-3 s per epoch on a 2-core CPU; the model plus Adam state is about
7 MB. ``scale`` shrinks (or, above 1, grows with shifted copies) the training
and validation sets together, so evaluation stays about 5% of an epoch.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass

FULL = {"epochs": 20, "scale": 1.0}
QUICK = {"epochs": 4, "scale": 0.08}


@dataclass
class Config:
    epochs: int = 20
    scale: float = 1.0
    seed: int = 0
    freeze: bool = False  # frozen-backbone fine-tune: only the last layer trains
    threads: int = 0  # torch threads in the training process; 0 = torch's default

    def to_dict(self):
        return asdict(self)


SETUP_BODY = '''
import random
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

SIZE = 16
BATCH = 32
torch.manual_seed(SEED); np.random.seed(SEED); random.seed(SEED)


def make_data(scale, seed):
    d = load_digits()
    X = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    X = F.interpolate(X, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    Xv, yv, Xt, yt = X[:297], y[:297], X[297:], y[297:]

    def grow(A, b, n):  # n samples: a prefix, or extra copies shifted by a pixel
        k = 0
        As, bs = [A], [b]
        while sum(len(a) for a in As) < n:
            k += 1
            As.append(torch.roll(A, shifts=(k % 3 - 1, (k // 3) % 3 - 1), dims=(2, 3)))
            bs.append(b)
        return torch.cat(As)[:n].contiguous(), torch.cat(bs)[:n].contiguous()

    n_train = max(2 * BATCH, int(round(len(Xt) * scale)))
    n_val = max(16, int(round(0.3 * n_train)))  # evaluation ~5% of an epoch
    Xt, yt = grow(Xt, yt, n_train)
    Xv, yv = grow(Xv, yv, n_val)
    return Xt, yt, Xv, yv


def make_model():
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (SIZE // 4) ** 2, 512), nn.ReLU(), nn.Dropout(0.25),
        nn.Linear(512, 10),
    )


def evaluate(m, X, y):
    m.eval()
    with torch.no_grad():
        return float((m(X).argmax(1) == y).float().mean())


def grad_norm(m):
    return float(sum(p.grad.norm() ** 2 for p in m.parameters() if p.grad is not None) ** 0.5)


def weight_norm(m):
    return float(sum(p.detach().norm() ** 2 for p in m.parameters()) ** 0.5)


Xt, yt, Xv, yv = make_data(SCALE, SEED)
loader = DataLoader(TensorDataset(Xt, yt), batch_size=BATCH, shuffle=True,
                    generator=torch.Generator().manual_seed(SEED))
model = make_model()
if FREEZE:  # fine-tune: freeze the backbone, train the last layer (BatchNorm stats still move)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model[-1].parameters():
        p.requires_grad_(True)
opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
'''

TRAIN = '''history = []
best = 0.0
for epoch in range(EPOCHS):
    model.train()
    for xb, yb in loader:
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        flor.log("loss", loss.item())
    sched.step()
    val_acc = evaluate(model, Xv, yv)
    history.append(val_acc)
    best = max(best, val_acc)
    flor.log("val_acc", val_acc)
'''

# Probes: the edited training cell a user would replay.
_STEP_ANCHOR = "        loss.backward()\n"
_EPOCH_ANCHOR = '    flor.log("val_acc", val_acc)\n'
STEP_PROBE = TRAIN.replace(_STEP_ANCHOR, _STEP_ANCHOR + '        flor.log("grad_norm", grad_norm(model))\n')
EPOCH_PROBE = TRAIN.replace(_EPOCH_ANCHOR, _EPOCH_ANCHOR + '    flor.log("weight_norm", weight_norm(model))\n')
assert STEP_PROBE != TRAIN and EPOCH_PROBE != TRAIN


def setup_code(cfg: Config) -> str:
    """The setup cell, with the configuration baked in (replay re-runs this text)."""
    head = (f"SEED = {cfg.seed}\nSCALE = {cfg.scale!r}\nEPOCHS = {cfg.epochs}\nFREEZE = {cfg.freeze}\n")
    if cfg.threads:
        head += f"import torch as _t\n_t.set_num_threads({cfg.threads})\n"
    return head + SETUP_BODY


class NoFlor:
    """Stands in for ``flor`` in the baseline: no recording machinery at all."""

    @staticmethod
    def log(name, value):
        return value

    @staticmethod
    def arg(name, default):
        return default

    @staticmethod
    def loop(name, iterable):
        return iterable


def namespace(cfg: Config, flor=None) -> dict:
    """A fresh namespace with the setup cell run in it (``flor`` bound to ``flor``)."""
    ns = {"__name__": "__main__", "flor": flor if flor is not None else NoFlor()}
    exec(compile(setup_code(cfg), "<setup>", "exec"), ns)
    return ns


def run_plain(cfg: Config, code: str = TRAIN) -> float:
    """Run ``code`` without flor in a fresh namespace; return the cell's seconds (setup excluded)."""
    ns = namespace(cfg)
    t = time.perf_counter()
    exec(compile(code, "<train>", "exec"), ns)
    return time.perf_counter() - t


def state_bytes(ns: dict) -> dict:
    """Raw training state: tensor bytes of the model (params + buffers) and the optimizer."""
    import torch

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v)

    model = sum(t.numel() * t.element_size() for t in tensors(ns["model"].state_dict()))
    opt = sum(t.numel() * t.element_size() for t in tensors(ns["opt"].state_dict()))
    trainable = sum(p.numel() * p.element_size() for p in ns["model"].parameters() if p.requires_grad)
    return {"model": model, "optimizer": opt, "total": model + opt, "trainable_params": trainable}


def main(argv=None):
    p = argparse.ArgumentParser(description="Run the workload plainly (no flor) and print timings.")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--freeze", action="store_true")
    a = p.parse_args(argv)
    cfg = Config(epochs=a.epochs, scale=a.scale, freeze=a.freeze)
    t0 = time.perf_counter()
    ns = namespace(cfg)
    setup_s = time.perf_counter() - t0
    t = time.perf_counter()
    exec(compile(TRAIN, "<train>", "exec"), ns)
    train_s = time.perf_counter() - t
    steps = len(ns["loader"])
    t = time.perf_counter()
    ns["evaluate"](ns["model"], ns["Xv"], ns["yv"])
    eval_s = time.perf_counter() - t
    per_epoch = train_s / cfg.epochs
    print(f"setup {setup_s:.2f}s; {cfg.epochs} epochs in {train_s:.2f}s ({per_epoch:.2f}s/epoch, {steps} steps); "
          f"eval {eval_s * 1e3:.0f} ms = {eval_s / per_epoch:.1%} of an epoch; val_acc {ns['history'][-1]:.3f}; "
          f"state {state_bytes(ns)}")


if __name__ == "__main__":
    main()
