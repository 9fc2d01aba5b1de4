"""The %%flor magics in a real IPython shell: record, replay, errors, what the user sees."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest
import torch
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

ROOT = pathlib.Path(__file__).resolve().parents[1]

SETUP = """
import torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
X = torch.randn(96, 6); y = (X[:, 0] > 0).long()
"""
MODEL = """
model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
"""
TRAIN = """
history = []
for epoch in range(4):
    perm = torch.randperm(96)
    for i in range(0, 96, 32):
        idx = perm[i:i + 32]
        loss = F.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad(); loss.backward(); opt.step()
        flor.log("loss", loss.item())
    history.append(loss.item())
    flor.log("last", history[-1])
"""


@pytest.fixture
def ip(store):
    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext flor_nb")
    yield shell
    shell.run_cell("%unload_ext flor_nb")
    InteractiveShell.clear_instance()  # a shell left behind changes how widgets format output


def run(ip, src):
    result = ip.run_cell(src, store_history=True)
    if result.error_before_exec:
        raise result.error_before_exec
    if result.error_in_exec:
        raise result.error_in_exec
    return result.result


def test_record_then_replay_leaves_live_objects_alone(ip, capsys):
    run(ip, SETUP)
    run(ip, MODEL)
    run(ip, "for _ in range(2):\n    model(X)  # a cell that must never be re-run")
    capsys.readouterr()
    run(ip, "%%flor record --name m --no-progress\n" + TRAIN)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("flor_nb: finished m@1: 4 epochs")  # no echo of each value
    run_ = ip.user_ns["flor"].get_run("m")
    sources = [c["source"] for c in run_.deps]
    assert len(sources) == 2 and "manual_seed" in sources[0] and "nn.Sequential" in sources[1]
    live = {k: v.clone() for k, v in ip.user_ns["model"].state_dict().items()}
    live_history = list(ip.user_ns["history"])
    probe = TRAIN.replace("opt.step()", "flor.log('gw', model[0].weight.grad.norm().item()); opt.step()")
    df = run(ip, "%%flor replay m --epochs 1-2 --no-progress\n" + probe)
    assert "Faithful replay" in capsys.readouterr().out
    assert df["gw"].notna().sum() == 6 and set(df["epoch"]) == {1, 2}
    assert all(torch.equal(live[k], v) for k, v in ip.user_ns["model"].state_dict().items())
    assert ip.user_ns["history"] == live_history


def test_recording_again_makes_a_new_version(ip):
    run(ip, SETUP)
    run(ip, MODEL)
    run(ip, "%%flor record --name v --no-progress\n" + TRAIN)
    run(ip, "%%flor record --name v --no-progress\n" + TRAIN)
    runs = run(ip, "%flor runs")
    assert runs[runs["name"] == "v"]["version"].tolist() == [1, 2]
    df = run(ip, "%%flor replay v@1 --epochs 3 --no-progress\n" + TRAIN)
    assert df.attrs["run"] == "v@1"


def test_user_exception_is_shown_and_run_kept(ip):
    run(ip, SETUP)
    run(ip, MODEL)
    bad = TRAIN + "    if epoch == 2:\n        raise ValueError('diverged')\n"
    with pytest.raises(ValueError, match="diverged"):
        run(ip, "%%flor record --name bad --no-progress\n" + bad)
    r = ip.user_ns["flor"].get_run("bad")
    assert (r.status, r.epochs_completed) == ("failed", 2)
    assert "ValueError: diverged" in r.error


@pytest.mark.parametrize("line,match", [
    ("%flor", "record the cell below"),
    ("%flor nonsense", "Unknown %flor command"),
    ("%flor record", "cell magic"),
    ("%%flor replay nope\nfor e in range(2):\n    pass", "No run 'nope'"),
    ("%%flor record --name x\ny = 1", "no for loop"),
])
def test_usage_errors(ip, line, match):
    with pytest.raises(UsageError, match=match):
        run(ip, line)


def test_engine_never_imports_ipython_or_shells():
    code = "import flor_nb, sys; import flor_nb.replay, flor_nb.worker; print('IPython' in sys.modules, 'ipywidgets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"
    for path in (ROOT / "flor_nb").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.startswith(("IPython", "ipywidgets", "flor_nb.extension", "flor_nb.widgets"))
                               for n in names), f"{path.name} imports a shell"
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                pytest.fail(f"print() in library code: {path.name}:{node.lineno}")


def test_unfaithful_verdict_and_not_captured_state_go_to_stderr(ip, capsys):
    run(ip, SETUP)
    run(ip, MODEL + "import numpy as np, threading\nclass Guard:\n    def __init__(self):\n"
                    "        self.lock, self.n = threading.Lock(), 0\nguard = Guard()\n")
    capsys.readouterr()
    train = TRAIN.replace("    history.append", "    guard.n += 1\n    history.append")
    with pytest.warns(UserWarning, match="not captured in g@1: guard.lock"):
        run(ip, "%%flor record --name g --no-progress\n" + train)
    out = capsys.readouterr()
    assert out.out.startswith("flor_nb: finished g@1")
    assert "flor_nb: Not captured in g@1: guard.lock (lock: a lock (threading) cannot be saved)" in out.err
    run(ip, "%%flor replay g --epochs 2 --no-progress\n" + train.replace(
        "    history.append", "    flor.log('draw', float(np.random.rand()))\n    history.append"))
    out = capsys.readouterr()
    assert "Replay NOT faithful: numpy's global RNG differs after epoch 1" in out.err  # 1-2 ran, from epoch 0's end
    assert "NOT faithful" not in out.out
