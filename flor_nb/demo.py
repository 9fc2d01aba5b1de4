"""``python -m flor_nb.demo``: record a digits CNN, replay two epochs with a probe, write a report.

Runs from a plain script, no notebook needed: the same engine the magics use.
Options: ``--epochs N`` (default 6), ``--store PATH`` (default ./.flor).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import flor_nb as flor

DIGITS = '''
from sklearn.datasets import load_digits

digits = load_digits()
X = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0   # (N, 1, 8, 8)
y = torch.tensor(digits.target)
'''

# Without scikit-learn: ten 8x8 "digit" prototypes and noisy copies of them, made with torch alone.
SYNTHETIC = '''
g = torch.Generator().manual_seed(7)
prototypes = (torch.rand(10, 8, 8, generator=g) > 0.6).float()               # (10, 8, 8)
y = torch.arange(1797) % 10
X = (prototypes[y] + 0.35 * torch.randn(1797, 8, 8, generator=g)).clamp(0, 1).unsqueeze(1)   # (N, 1, 8, 8)
'''

SETUP = '''
import torch, torch.nn as nn, torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
@DATA@
perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
loader = DataLoader(TensorDataset(X[perm[:1400]], y[perm[:1400]]), batch_size=64, shuffle=True,
                    generator=torch.Generator().manual_seed(1))
X_val, y_val = X[perm[1400:]], y[perm[1400:]]

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(self.drop(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1)))

model = Net()
opt = torch.optim.Adam(model.parameters(), lr=flor.arg("lr", 3e-3))
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

@torch.no_grad()
def evaluate(m):
    m.eval()
    return (m(X_val).argmax(1) == y_val).float().mean().item()

def grad_norm(m):
    return torch.norm(torch.stack([p.grad.norm() for p in m.parameters()])).item()
'''

TRAIN = '''
best = 0.0
for epoch in range(EPOCHS):
    model.train()
    for xb, yb in loader:
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(); loss.backward()
        opt.step()
        flor.log("loss", loss.item())
    sched.step()
    acc = evaluate(model)
    best = max(best, acc)
    flor.log("val_acc", acc)
'''

PROBE = TRAIN.replace("        opt.step()\n", "        flor.log(\"grad_norm\", grad_norm(model))\n        opt.step()\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flor_nb.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--store", default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO, stream=sys.stdout)
    say = logging.getLogger("flor_nb.demo").info
    try:
        import sklearn.datasets  # noqa: F401 - only to know whether the real digits are there
        data = DIGITS
    except ImportError:
        data = SYNTHETIC
        say("scikit-learn is not installed (pip install flor_nb[demo]): using synthetic 8x8 digits instead")
    cells = [f"EPOCHS = {a.epochs}\n{SETUP.replace('@DATA@', data)}"]
    ns = {"flor": flor}
    exec(cells[0], ns)
    run = flor.record(TRAIN, name="digits", namespace=ns, cells=cells, store=a.store, progress=True)
    say(flor.api.summary(run, a.store))
    epochs = f"{a.epochs // 2 - 1}-{a.epochs // 2}"
    say(f"\nReplaying epochs {epochs} with a new probe: grad_norm at every step")
    df = flor.replay(run.label, code=PROBE, epochs=epochs, store=a.store)
    say(df.attrs["verdict"])
    steps = df.dropna(subset=["grad_norm"])
    say(steps.groupby("epoch")["grad_norm"].describe()[["count", "mean", "min", "max"]].to_string())
    path = flor.report(run.label, html=True, store=a.store)
    say(f"\nReport: {os.path.relpath(path)}\n        {os.path.relpath(path.with_suffix('.html'))}")
    return 0 if df.attrs["fidelity"]["faithful"] else 1


if __name__ == "__main__":
    sys.exit(main())
