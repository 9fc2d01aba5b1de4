"""The notebooks run in real kernels (ipykernel + nbclient), including replay after a restart."""
from __future__ import annotations

import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

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
    assert (store.home / "reports" / "digits@1.ipynb").exists() and (store.home / "reports" / "digits@1.html").exists()


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
