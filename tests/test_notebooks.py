"""The notebooks run in real kernels (ipykernel + nbclient), including replay after a restart."""
from __future__ import annotations

import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # real kernels: `-m "not slow"` skips them locally

ROOT = pathlib.Path(__file__).resolve().parents[1]


def execute(nb, cwd):
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs(nb, needle):
    """All outputs of the first code cell whose source contains ``needle``."""
    cell = next(c for c in nb.cells if c.cell_type == "code" and needle in c.source)
    return cell.outputs


def text(outs):
    parts = []
    for o in outs:
        if o.output_type == "stream":
            parts.append(o.text)
        elif "data" in o:
            parts.append(o.data.get("text/plain", ""))
            parts.append(o.data.get("text/html", ""))
    return "\n".join(parts)


@pytest.mark.timeout(400)
def test_quickstart(store, tmp_path):
    nb = execute(nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4), tmp_path)
    rec = text(outputs(nb, "%%flor record --name digits"))
    assert re.search(r"flor_nb: finished digits@1: 8 epochs in [\d.]+s, \d+ checkpoints \([\d.]+ MB\)", rec), rec
    # the progress line, updated in place to its last state (one display, not a widget)
    assert re.search(r"digits@1: 8/8 epochs \[\d\d:\d\d, [\d.]+ epoch/s\] \w+=", rec), rec
    assert '<progress value="8" max="8"' in rec, rec
    assert "digits" in text(outputs(nb, "flor.runs()"))
    rep = outputs(nb, "%%flor replay digits --epochs 2,5")
    assert "Faithful replay: recorded metrics reproduced exactly" in text(rep)
    assert any("image/png" in o.get("data", {}) for o in rep)
    table = next(o for o in rep if o.output_type == "execute_result").data["text/html"]
    assert "grad_norm" in table and "val_acc" in table
    assert any("image/png" in o.get("data", {}) for o in outputs(nb, "Gradient norm per step"))
    norms = text(outputs(nb, "weight_norm(model))'"))
    assert "Faithful replay" in norms and "weight_norm" in norms
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs(nb, "%flor ui"))
    assert "report written to" in text(outputs(nb, "%flor report"))
    assert (tmp_path / "flor_reports" / "digits@1.ipynb").exists() and (tmp_path / "flor_reports" / "digits@1.html").exists()


RECORD = [
    "%load_ext flor_nb",
    "import torch, torch.nn as nn, torch.nn.functional as F\ntorch.manual_seed(0)\n"
    "X = torch.randn(128, 8); y = (X[:, :2].sum(1) > 0).long()\n"
    "model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))\n"
    "opt = torch.optim.Adam(model.parameters(), lr=1e-2)",
    "%%flor record --name restart --no-progress\n"
    "for epoch in range(4):\n"
    "    perm = torch.randperm(128)\n"
    "    for i in range(0, 128, 32):\n"
    "        loss = F.cross_entropy(model(X[perm[i:i+32]]), y[perm[i:i+32]])\n"
    "        opt.zero_grad(); loss.backward(); opt.step()\n"
    "        flor.log('loss', loss.item())",
]
REPLAY = [
    "%load_ext flor_nb",
    "%%flor replay restart --epochs 1,3 --no-progress\n"
    "for epoch in range(4):\n"
    "    perm = torch.randperm(128)\n"
    "    for i in range(0, 128, 32):\n"
    "        loss = F.cross_entropy(model(X[perm[i:i+32]]), y[perm[i:i+32]])\n"
    "        opt.zero_grad(); loss.backward()\n"
    "        flor.log('w_grad', model[0].weight.grad.abs().sum().item())\n"
    "        opt.step()\n"
    "        flor.log('loss', loss.item())",
    "'model' in dir()",
]


@pytest.mark.timeout(300)
def test_replay_after_kernel_restart(store, tmp_path):
    new = nbformat.v4.new_notebook
    execute(new(cells=[nbformat.v4.new_code_cell(s) for s in RECORD]), tmp_path)
    nb = execute(new(cells=[nbformat.v4.new_code_cell(s) for s in REPLAY]), tmp_path)  # a fresh kernel
    out = text(nb.cells[1].outputs)
    assert "Faithful replay: recorded metrics reproduced exactly: loss exact (8 values)" in out
    assert "w_grad" in out
    assert "False" in text(nb.cells[2].outputs)  # the new kernel's namespace was never touched


# A notebook as people write it: helpers that change through their methods, early stopping, a numpy LR
# table, shared history containers, a numpy noise generator. Cells are kept separate, as in a notebook.
REAL_SETUP = [
    "import random\nimport numpy as np\nimport torch, torch.nn as nn, torch.nn.functional as F\n"
    "torch.manual_seed(0); np.random.seed(0); random.seed(0)\n"
    "X = torch.randn(320, 12); y = (X[:, 0] * X[:, 1] > 0).long()",
    "model = nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Dropout(0.25), nn.Linear(48, 2))\n"
    "opt = torch.optim.AdamW(model.parameters(), lr=3e-3)\n"
    "lr_table = np.geomspace(3e-3, 3e-4, 30)",
    "class EMA:\n"
    "    def __init__(self, model, decay=0.95):\n"
    "        self.decay, self.n = decay, 0\n"
    "        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}\n"
    "    @torch.no_grad()\n"
    "    def update(self, model):\n"
    "        self.n += 1\n"
    "        for k, v in model.state_dict().items():\n"
    "            self.shadow[k].lerp_(v, 1 - self.decay)\n"
    "class Stopper:\n"
    "    def __init__(self, patience=2):\n"
    "        self.patience, self.best, self.bad = patience, float('inf'), 0\n"
    "    def __call__(self, v):\n"
    "        self.best, self.bad = (v, 0) if v < self.best else (self.best, self.bad + 1)\n"
    "        return self.bad > self.patience\n"
    "ema, stop = EMA(model), Stopper()\n"
    "noise = np.random.default_rng(3)\n"
    "history = {'val': [], 'lr': []}\n"
    "vals = history['val']",
]
REAL_TRAIN = (
    "for epoch in range(6):\n"
    "    for g in opt.param_groups:\n"
    "        g['lr'] = lr_table[epoch]\n"
    "    model.train()\n"
    "    perm = torch.randperm(320)\n"
    "    for i in range(0, 320, 40):\n"
    "        xb = X[perm[i:i + 40]] + torch.from_numpy(noise.normal(0, 0.05, (40, 12))).float()\n"
    "        loss = F.cross_entropy(model(xb), y[perm[i:i + 40]])\n"
    "        opt.zero_grad(); loss.backward(); opt.step()\n"
    "        ema.update(model)\n"
    "        flor.log('loss', loss.item())\n"
    "    model.eval()\n"
    "    with torch.no_grad():\n"
    "        v = F.cross_entropy(model(X), y).item()\n"
    "    vals.append(v)\n"
    "    history['lr'].append(opt.param_groups[0]['lr'])\n"
    "    flor.log('val', v)\n"
    "    if stop(v):\n"
    "        break\n"
)
REAL_PROBES = (
    "    flor.log('ema_n', ema.n)\n"
    "    flor.log('ema_w', float(ema.shadow['0.weight'].sum()))\n"
    "    flor.log('stop_best', stop.best)\n"
    "    flor.log('stop_bad', stop.bad)\n"
    "    flor.log('lr_now', opt.param_groups[0]['lr'])\n"
    "    flor.log('shared', history['val'] is vals)\n"
    "    flor.log('n_vals', len(vals))\n"
    "    flor.log('noise_pos', int(noise.bit_generator.state['state']['state'] % 999983))\n"
)
REAL_PROBED = REAL_TRAIN.replace("    model.eval()\n", REAL_PROBES + "    model.eval()\n")
REAL_NAMES = ["ema_n", "ema_w", "stop_best", "stop_bad", "lr_now", "shared", "n_vals", "noise_pos"]


@pytest.mark.timeout(400)
def test_real_training_state_replays_in_a_fresh_kernel(store, tmp_path):
    """Recorded in one kernel; probes from the start in another; replayed in a third, fresh kernel."""
    import pandas as pd

    import flor_nb as flor

    new, cell = nbformat.v4.new_notebook, nbformat.v4.new_code_cell
    rec = execute(new(cells=[cell("%load_ext flor_nb"), *map(cell, REAL_SETUP),
                             cell("%%flor record --name real --no-progress\n" + REAL_TRAIN)]), tmp_path)
    assert "flor_nb: finished real@1" in text(rec.cells[-1].outputs)
    assert "Not captured" not in text(rec.cells[-1].outputs)  # everything here can be captured
    execute(new(cells=[cell("%load_ext flor_nb"), *map(cell, REAL_SETUP),
                       cell("%%flor record --name truth --no-progress\n" + REAL_PROBED)]), tmp_path)
    out = tmp_path / "replayed.pkl"
    nb = execute(new(cells=[cell("%load_ext flor_nb"),
                            cell("%%flor replay real --epochs 2-4 --no-progress\n" + REAL_PROBED),
                            cell(f"df = _\ndf[df.step.isna()].to_pickle({str(out)!r})")]), tmp_path)
    verdict = text(nb.cells[1].outputs)
    assert "Faithful replay: recorded metrics reproduced exactly" in verdict, verdict
    assert "val exact (3 values)" in verdict and "training state identical" in verdict, verdict[:1500]
    got = {(int(r["epoch"]), n): r[n] for r in pd.read_pickle(out).to_dict("records") for n in REAL_NAMES}
    truth = flor.dataframe(*REAL_NAMES, run="truth", store=store)
    want = {(int(r.epoch), n): getattr(r, n) for r in truth[truth.step.isna()].itertuples() if r.epoch in (2, 3, 4)
            for n in REAL_NAMES}
    assert len(want) == 3 * len(REAL_NAMES)
    assert got == want and all(got[(e, "shared")] for e in (2, 3, 4))  # bit for bit
