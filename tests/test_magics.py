"""The %%flor magics in a real IPython shell: record, replay, errors, what the user sees."""
from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import flor_nb as flor

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


def _val_probe(code: str, before: str, expr: str) -> str:
    """``code`` with a read-only probe logging ``expr`` as ``val`` (eval mode, no grad, train mode after) inserted
    before the line starting with ``before``."""
    return code.replace(before, "    model.eval()\n    with torch.no_grad():\n"
                                f"        flor.log('val', {expr})\n    model.train()\n{before}")


def _replayed(ip, name, cells, code, probe, epochs="2"):
    """Imports, then ``cells``; record ``code`` as ``name``; replay ``epochs`` with ``probe``: the replay's frame."""
    run(ip, "import time, torch, torch.nn as nn, torch.nn.functional as F\n")
    for cell in cells:
        run(ip, cell)
    run(ip, f"%%flor record --name {name} --no-progress\n" + code)
    return run(ip, f"%%flor replay {name} --epochs {epochs} --no-progress\n" + probe)


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
    ("%%flor record --name x\ny = 1", "no training loop"),
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


def test_the_store_is_reached_without_a_function_level_import():
    """get_store lives in store.py and decode_value in api.py: no engine module imports them (or api) inside a
    function to dodge an import cycle."""
    found = []
    for path in sorted((ROOT / "flor_nb").rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    names = {a.name for a in node.names}
                    if names & {"get_store", "decode_value"} or (node.module in (None, "") and "api" in names) \
                            or (node.module or "").endswith("api") and node.level:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == [], found


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
        "    history.append", "    flor.log('draw', float(np.random.rand())); history.append"))
    out = capsys.readouterr()
    # Epoch 2 runs from the latest checkpoint before it (the default budget decides which): 1 or 2 epochs run.
    assert re.search(r"Replay NOT faithful: numpy's global RNG differs after epoch [12]:", out.err), out.err
    assert "NOT faithful" not in out.out


HELPER = """
def train_step(idx):
    loss = F.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad(); loss.backward(); opt.step()
    return loss.item()
"""
HELPED = """
for epoch in range(4):
    perm = torch.randperm(96)
    for i in range(0, 96, 32):
        flor.log("loss", train_step(perm[i:i + 32]))
"""


def _replay_ok(ip, label, code):
    """Replay with a probe in the step loop, so the recorded losses are recomputed and compared."""
    code = code.replace("        flor.log(\"loss\"", "        flor.log(\"w\", float(model[0].weight.sum()))\n"
                        "        flor.log(\"loss\"")
    df = run(ip, f"%%flor replay {label} --epochs 1-2 --no-progress\n" + code)
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]
    assert df.attrs["fidelity"]["metrics"]["loss"]["verdict"] == "exact" and df["w"].notna().sum() == 6
    return df


def test_a_helper_defined_before_the_model_finds_it(ip):
    run(ip, SETUP)
    run(ip, HELPER)  # reads `model` and `opt`, which the next cell creates
    run(ip, MODEL)
    run(ip, "%%flor record --name h --no-progress\n" + HELPED)
    assert [c["count"] for c in ip.user_ns["flor"].get_run("h").deps] == [1, 2, 3]
    _replay_ok(ip, "h", HELPED)


def test_recording_again_after_rerunning_setup_rebuilds_what_the_new_run_used(ip):
    run(ip, SETUP)
    run(ip, MODEL)
    run(ip, HELPER)
    run(ip, "%%flor record --name again --no-progress\n" + HELPED)
    run(ip, MODEL.replace("nn.Dropout(0.2)", "nn.Dropout(0.5)"))  # not in the state dict: only the cell says it
    run(ip, "%%flor record --name again --no-progress\n" + HELPED)
    run(ip, "%%flor record --name again --no-progress\n" + HELPED)  # the record cell itself, re-run
    for version in (1, 2, 3):
        _replay_ok(ip, f"again@{version}", HELPED)
    deps = ip.user_ns["flor"].get_run("again@3").deps
    assert [c["count"] for c in deps] == [1, 3, 5] and "Dropout(0.5)" in deps[2]["source"]


def test_time_and_capture_cells_keep_their_body(ip):
    run(ip, "%%capture out\n" + SETUP)
    run(ip, "%%time\n" + MODEL)
    run(ip, "%%timeit -n1 -r1\nmodel(X)")  # runs in a function: binds nothing, not a dependency
    run(ip, "%%flor record --name magic --no-progress\n" + TRAIN)
    deps = ip.user_ns["flor"].get_run("magic").deps
    assert [c["count"] for c in deps] == [1, 2]
    assert "torch.manual_seed(0)" in deps[0]["source"] and "nn.Sequential" in deps[1]["source"]
    df = run(ip, "%%flor replay magic --epochs 1-2 --no-progress\n" + TRAIN)
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]


def test_an_object_made_by_a_flor_cell_is_flagged_at_record(ip):
    run(ip, SETUP)
    run(ip, "%%flor record --name first --no-progress\n" + MODEL + TRAIN)
    with pytest.warns(UserWarning, match="will not be able to rebuild model, opt"):
        run(ip, "%%flor record --name second --no-progress\n" + TRAIN)


def test_args_belong_to_the_run_that_set_them(ip):
    run(ip, SETUP)
    run(ip, "lr = flor.arg('lr', 0.05)\n" + MODEL.replace("lr=0.1", "lr=lr"))
    run(ip, "wd = flor.arg('wd', 5e-4)")  # a cell no run depends on
    run(ip, "%%flor record --name a --no-progress\n" + TRAIN.replace("range(4)", "range(flor.arg('epochs', 4))"))
    run(ip, "%%flor record --name b --no-progress\n" + TRAIN)
    flor = ip.user_ns["flor"]
    assert flor.get_run("a").args == {"lr": 0.05, "epochs": 4}
    assert flor.get_run("b").args == {"lr": 0.05}  # neither wd nor the other run's epochs
    assert "arg.wd" not in run(ip, "%flor runs")
    probe = TRAIN.replace("range(4)", "range(flor.arg('epochs', 4))") + "    flor.log('lr_arg', flor.arg('lr', 9.0))\n"
    df = run(ip, "%%flor replay a --epochs 1 --no-progress\n" + probe)
    assert df["lr_arg"].dropna().tolist() == [0.05]  # replay still returns the run's recorded args


@pytest.mark.parametrize("line", [
    "%%flor record --help\nfor epoch in range(2):\n    raise SystemExit('the cell must not run')",
    "%%flor replay --help\nfor epoch in range(2):\n    pass",
    "%flor runs --help", "%flor ui --help", "%flor report -h", "%flor rm --help", "%flor du --help",
    "%flor gc --help", "%flor --help",
])
def test_every_magic_has_help(ip, capsys, line):
    assert run(ip, line) is None
    out = capsys.readouterr().out
    command = line.split()[1].lstrip("-")
    if command == "help":
        assert "%flor rm NAME[@VERSION]" in out and "Every command takes --help" in out
    else:
        prefix = "%%" if command in ("record", "replay") else "%"
        assert f"  {prefix}flor {command} [--store STORE]" in out, out
        assert "options:" in out and "--store STORE" in out and "unrecognized" not in out
    if command == "record":
        assert "--name" in out and "--overhead" in out and "Record the training cell below" in out


def _two_runs(ip):
    run(ip, SETUP)
    run(ip, MODEL)
    run(ip, "%%flor record --name keep --no-progress\n" + TRAIN)
    run(ip, "%%flor record --name gone --no-progress\n" + TRAIN.replace("range(4)", "range(3)"))


def test_rm_du_gc(ip, capsys, store):
    _two_runs(ip)
    runs = run(ip, "%flor runs")
    assert {"size_mb", "frees_mb", "last.loss", "last.last"} <= set(runs.columns)
    assert (runs["size_mb"] > 0).all() and (runs["frees_mb"] <= runs["size_mb"]).all()
    du = run(ip, "%flor du")
    assert list(du["what"][:2]) == ["keep@1", "gone@1"] and du["what"].iloc[-1].startswith("total")
    capsys.readouterr()
    run(ip, "%flor rm gone")
    out = capsys.readouterr().out
    assert out.startswith("flor_nb: deleted gone@1; freed ") and (" kB" in out or " MB" in out), out
    assert [r.label for r in store.all_runs()] == ["keep@1"]
    assert not (store.home / "checkpoints" / "gone@1").exists()
    with pytest.raises(UsageError, match="No run 'gone'"):
        run(ip, "%flor rm gone")
    run(ip, "%flor gc")
    assert "freed 0 B" in capsys.readouterr().out  # rm collected already
    df = run(ip, "%%flor replay keep --epochs 1-2 --no-progress\n" + TRAIN)  # what is left still replays
    assert df.attrs["fidelity"]["faithful"]


def test_report_magic_links_the_report_beside_the_notebook(ip, capsys, store, tmp_path):
    run(ip, SETUP)
    run(ip, MODEL)
    run(ip, "%%flor record --name rep --no-progress\n" + TRAIN)
    run(ip, "%%flor record --name rep --no-progress\n" + TRAIN)
    outs = []
    ip.display_pub.publish = lambda data, **kw: outs.append(data)
    run(ip, "%flor report rep --html")
    assert "report written to flor_reports/rep@2.ipynb and flor_reports/rep@2.html" in capsys.readouterr().out
    assert any('href="flor_reports/rep@2.ipynb"' in d.get("text/html", "") for d in outs)
    assert (tmp_path / "flor_reports" / "rep@2.html").exists()
    run(ip, "%flor report rep --all-versions")
    assert (tmp_path / "flor_reports" / "rep.ipynb").exists()


def test_wrong_run_leaves_no_empty_progress_bar(ip, capsys):
    with pytest.raises(UsageError, match="No run 'nope'"):
        run(ip, "%%flor replay nope --epochs 1\nfor e in range(2):\n    pass")
    captured = capsys.readouterr()
    assert "0/?" not in captured.err + captured.out and "replay nope" not in captured.err


def test_unknown_names_in_dataframe_say_what_was_logged(ip):
    run(ip, SETUP)
    run(ip, MODEL)
    run(ip, "%%flor record --name names --no-progress\n" + TRAIN)
    flor = ip.user_ns["flor"]
    with pytest.raises(flor.api.UnknownNameError, match=r"No values logged as 'losss' in run names.*"
                                                         r"Logged names: last, loss\. Did you mean 'loss'"):
        flor.dataframe("losss", run="names")
    assert len(flor.dataframe("loss", run="names")) == 12


QS_SETUP = """
import torch

import flor_nb as flor
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0)
Xall = torch.randn(256, 20); yall = torch.randint(0, 4, (256,))
train_dataloader = DataLoader(TensorDataset(Xall[:192], yall[:192]), batch_size=32, shuffle=True)
test_dataloader = DataLoader(TensorDataset(Xall[192:], yall[192:]), batch_size=32)
model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
loss_fn = nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
"""
QS_HELPERS = """
def train(dataloader, model, loss_fn, optimizer):
    model.train()
    for batch, (X, y) in enumerate(dataloader):
        pred = model(X)
        loss = loss_fn(pred, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        flor.log("loss", loss.item())

def test(dataloader, model, loss_fn):
    model.eval()
    correct = 0
    with torch.no_grad():
        for X, y in dataloader:
            correct += (model(X).argmax(1) == y).type(torch.float).sum().item()
    flor.log("acc", correct / len(dataloader.dataset))
"""
QS_TRAIN = """
for t in range(4):
    train(train_dataloader, model, loss_fn, optimizer)
    test(test_dataloader, model, loss_fn)
"""


def test_a_helper_edited_in_the_kernel_is_replayed_and_named(ip, capsys):
    """PyTorch's quickstart shape: the batch loop is in train(), defined in an earlier cell. Its loop is the
    step loop (checkpointed at its exit, skipped for probes after it); a probe added to train() and the cell
    run again is what %%flor replay uses, and it says so."""
    run(ip, QS_SETUP)
    run(ip, QS_HELPERS)
    run(ip, "%%flor record --name qs --no-progress --overhead inf\n" + QS_TRAIN)
    recorded = ip.user_ns["flor"].get_run("qs")
    assert recorded.state["loops"]["helper"]["header"] == "for (batch, (X, y)) in enumerate(dataloader)"
    df = run(ip, "%%flor replay qs --epochs 2-3 --no-progress\n" + QS_TRAIN + "    flor.log('w', float(model[0].weight.sum()))\n")
    assert set(df.attrs["fidelity"]["modes"].values()) == {"skip"} and df.attrs["fidelity"]["faithful"]
    capsys.readouterr()
    run(ip, QS_HELPERS.replace("        optimizer.step()\n",
                               "        flor.log('gn', float(model[0].weight.grad.norm()))\n        optimizer.step()\n"))
    df = run(ip, "%%flor replay qs --epochs 2 --no-progress\n" + QS_TRAIN)
    out = capsys.readouterr().out
    assert "flor_nb: replaying with train() from In[" in out and "in place of the recorded In[" in out
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]
    assert df["gn"].notna().sum() == 6 and df["loss"].notna().sum() == 6
    df = run(ip, "%%flor replay qs --epochs 2 --no-progress --recorded-cells\n" + QS_TRAIN)
    assert "gn" not in df.columns


def test_dataloader_workers_with_a_notebook_dataset_and_quiet_setup(ip, capsys):
    """A Dataset class defined in a cell, loaded by worker processes: replay workers start DataLoader workers
    as the recording kernel did (fork), so they find the class; what the setup cells print stays quiet."""
    run(ip, "import torch, torch.nn as nn, torch.nn.functional as F\n"
            "from torch.utils.data import Dataset, DataLoader\ntorch.manual_seed(0)\n"
            "class _Cells(Dataset):\n"
            "    def __init__(self, n):\n"
            "        g = torch.Generator().manual_seed(3)\n"
            "        self.x = torch.randn(n, 8, generator=g); self.y = (self.x[:, 0] > 0).long()\n"
            "    def __len__(self): return len(self.x)\n"
            "    def __getitem__(self, i): return self.x[i] + 0.01 * torch.randn(8), self.y[i]\n"
            "loader = DataLoader(_Cells(128), batch_size=32, shuffle=True, num_workers=2,\n"
            "                    generator=torch.Generator().manual_seed(1))\n"
            "model = nn.Linear(8, 2); opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
            "print('setup says hello')")
    train = ("for epoch in range(3):\n    for xb, yb in loader:\n        loss = F.cross_entropy(model(xb), yb)\n"
             "        opt.zero_grad(); loss.backward(); opt.step()\n        flor.log('loss', loss.item())\n")
    run(ip, "%%flor record --name dlw --no-progress --overhead inf\n" + train)
    capsys.readouterr()
    probe = train.replace("        flor.log('loss'", "        flor.log('b', float(xb.sum()))\n        flor.log('loss'")
    df = run(ip, "%%flor replay dlw --epochs 1-2 --no-progress\n" + probe)
    out = capsys.readouterr().out
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]  # augmentation noise drawn in the workers, too
    assert df["b"].notna().sum() == 8 and "setup says hello" not in out
    run(ip, "%%flor replay dlw --epochs 2 --no-progress --show-setup\n" + probe)
    assert "setup says hello" in capsys.readouterr().out


@pytest.mark.parametrize("pause", ["", "    time.sleep(0.25)\n"])  # epochs longer than its redraw interval too
def test_the_record_progress_line_is_one_display_updated_in_place(ip, pause):
    """The recording's progress is one display (HTML with a text twin), updated as units end and shown in
    its final state at the end: no widget, and no more updates than units. (With epochs longer than its redraw
    interval, the loop's last flush, which adds no unit, drew it once more than that.)"""
    from IPython.utils.capture import capture_output

    run(ip, "import time\n" + SETUP)
    run(ip, MODEL)
    with capture_output() as captured:
        run(ip, "%%flor record --name shown\n" + TRAIN.replace("    history.append", pause + "    history.append"))
    shown = [o.data for o in captured.outputs]
    assert shown and all(set(d) == {"text/plain", "text/html"} for d in shown), shown
    assert len(shown) <= 1 + 4 + 1, shown  # the first display, at most one update per epoch, the close
    assert shown[0]["text/plain"].startswith("shown@1: 0/4 epochs"), shown[0]
    last = shown[-1]["text/plain"]
    assert re.match(r"shown@1: 4/4 epochs \[00:\d\d, [\d.]+ epoch/s\] loss=\S+, last=\S+$", last), shown
    assert '<progress value="4" max="4"' in shown[-1]["text/html"]


def test_the_progress_line_of_a_while_loop_counts_iterations(ip):
    """A while loop has no known length: the line counts iterations, with no bar."""
    from IPython.utils.capture import capture_output

    run(ip, SETUP)
    run(ip, MODEL)
    loop = ("it = 0\nwhile it < 40:\n    idx = torch.randint(0, 96, (16,))\n"
            "    loss = F.cross_entropy(model(X[idx]), y[idx])\n"
            "    opt.zero_grad(); loss.backward(); opt.step()\n    flor.log('loss', loss.item())\n    it += 1\n")
    with capture_output() as captured:
        run(ip, "%%flor record --name iters\n" + loop)
    last = captured.outputs[-1].data
    assert re.match(r"iters@1: 40 iterations \[00:\d\d, [\d.]+ iteration/s\]", last["text/plain"]), last
    assert "<progress" not in last["text/html"]


def test_the_progress_line_keeps_the_last_values_when_a_unit_logs_none(ip):
    """The line shows the latest logged values: a last epoch that logs nothing (or the cell's final flush, as
    seen in a real kernel) does not blank them."""
    from IPython.utils.capture import capture_output

    run(ip, SETUP)
    run(ip, MODEL)
    quiet_end = TRAIN.replace('    flor.log("last", history[-1])\n', '    if epoch < 3:\n        flor.log("last", history[-1])\n')
    quiet_end = quiet_end.replace('        flor.log("loss", loss.item())\n', '        if epoch < 3:\n            flor.log("loss", loss.item())\n')
    assert quiet_end.count("if epoch < 3") == 2
    with capture_output() as captured:
        run(ip, "%%flor record --name quiet\n" + quiet_end)
    last = captured.outputs[-1].data["text/plain"]
    assert re.match(r"quiet@1: 4/4 epochs \[00:\d\d, [\d.]+ epoch/s\] loss=\S+, last=\S+$", last), last


def test_a_value_computed_after_an_earlier_training_is_the_recorded_one_in_a_replay(ip):
    """A probe reads ``baseline``, which a cell computed from the model after a first training: a replay skips
    that training, so re-running the cell gave the untrained model's loss under a "Faithful" verdict."""
    run(ip, SETUP)
    run(ip, MODEL)
    run(ip, TRAIN.replace("flor.log", "print").replace("range(4)", "range(3)"))  # pre-training, not recorded
    run(ip, "baseline = F.cross_entropy(model(X), y).item()\nopt = torch.optim.SGD(model.parameters(), lr=0.05)\n")
    baseline = ip.user_ns["baseline"]
    run(ip, "%%flor record --name ft --no-progress\n" + TRAIN)
    assert ip.user_ns["flor"].get_run("ft").state["after_training"]["baseline"][1] == 3  # In[3] trained
    probe = TRAIN.replace("        flor.log(\"loss\"", "        flor.log(\"gain\", baseline - loss.item())\n"
                          "        flor.log(\"loss\"")
    df = run(ip, "%%flor replay ft --epochs 2-3 --no-progress\n" + probe)
    assert df.attrs["fidelity"]["faithful"] and "Faithful replay" in df.attrs["verdict"], df.attrs["verdict"]
    rows = df[df["gain"].notna()]
    assert len(rows) == 6 and (rows["gain"] == baseline - rows["loss"]).all(), (baseline, rows)


def test_names_left_out_by_state_after_an_earlier_training_are_said_and_flagged_when_read(ip, capsys):
    run(ip, SETUP)
    run(ip, MODEL)
    run(ip, TRAIN.replace("flor.log", "print").replace("range(4)", "range(3)"))
    run(ip, "baseline = F.cross_entropy(model(X), y).item()\nopt = torch.optim.SGD(model.parameters(), lr=0.05)\n")
    with pytest.warns(UserWarning, match=r"baseline: computed by In\[4\] after the training in In\[3\].*--state "
                                         r"\+baseline"):
        run(ip, "%%flor record --name nar --state model,opt,X,y,history --no-progress\n" + TRAIN)
    probe = TRAIN.replace("    history.append", "    flor.log('gain', baseline - loss.item())\n    history.append")
    df = run(ip, "%%flor replay nar --epochs 2 --no-progress\n" + probe)
    assert not df.attrs["fidelity"]["faithful"] or df.attrs["fidelity"]["level"] != "faithful", df.attrs["verdict"]
    assert "baseline (computed by In[4] after the training in In[3]" in df.attrs["verdict"], df.attrs["verdict"]


def test_a_probe_reading_a_value_an_unseeded_cell_rebuilds_differently_is_told(ip, tmp_path):
    """``Xv`` comes from an unseeded draw (torch 2.13 seeds itself at random in each process; here the clock seeds
    it, so the replay's draw differs for sure), or from a file rewritten since: only the probe reads it, so the
    replay's re-run cell makes another one. The verdict says so, by name, instead of "Faithful"."""
    probe = _val_probe(TRAIN, "    history.append", "F.cross_entropy(model(Xv), yv).item()")
    df = _replayed(ip, "us", ["torch.manual_seed(time.time_ns() % 2 ** 31)  # as torch seeds itself, differently in "
                              "each process\nX = torch.randn(96, 6); y = (X[:, 0] > 0).long()\n"
                              "Xv = torch.randn(32, 6); yv = (Xv[:, 0] > 0).long()\n", MODEL], TRAIN, probe)
    fid = df.attrs["fidelity"]
    assert fid["faithful"] and fid["level"] == "caveats", df.attrs["verdict"]
    assert set(fid["rebuilt_differs"]) == {"Xv", "yv"}, fid["rebuilt_differs"]
    assert "NOT the recording's value, read by the replayed code: Xv, yv (re-running In[" in df.attrs["verdict"]
    # A file rewritten since the recording.
    held = tmp_path / "held-out.pt"
    torch.save(torch.randn(32, 6), held)
    run(ip, f"torch.manual_seed(3)\nX = torch.randn(96, 6); y = (X[:, 0] > 0).long()\nXv = torch.load({str(held)!r})\n"
            "yv = (Xv[:, 0] > 0).long()\n")
    run(ip, MODEL)
    run(ip, "%%flor record --name fi --no-progress\n" + TRAIN)
    df = run(ip, "%%flor replay fi --epochs 2 --no-progress\n" + probe)  # the same file: nothing to say
    assert df.attrs["fidelity"]["level"] == "faithful" and not df.attrs["fidelity"]["rebuilt_differs"], \
        df.attrs["verdict"]
    torch.save(torch.randn(32, 6), held)
    df = run(ip, "%%flor replay fi --epochs 2 --no-progress\n" + probe)
    assert set(df.attrs["fidelity"]["rebuilt_differs"]) == {"Xv", "yv"}, df.attrs["verdict"]


@pytest.mark.parametrize("seed", ["random.seed(time.time_ns())\n", "random.seed(1)\n"])
def test_a_list_of_rows_an_unseeded_cell_rebuilds_differently_is_told(ip, seed):
    """Rows built in Python (makemore's contexts) are digested packed, at C speed; a probe reading ones an unseeded
    draw rebuilt differently is still told, and a seeded rebuild is no difference. (The clock seeds the unseeded
    case: a replay worker forked from a process whose ``random`` had not moved since would draw the same rows.)"""
    probe = _val_probe(TRAIN, "    history.append", "float(sum(map(sum, rows)))")
    cell = f"import random, time\n{seed}rows = [[random.randrange(9) for _ in range(3)] for _ in range(500)]\n"
    df = _replayed(ip, "rw" + str(len(seed)), [SETUP + cell, MODEL], TRAIN, probe)  # a cell the replay re-runs
    fid = df.attrs["fidelity"]
    if "time" not in seed:
        assert fid["level"] == "faithful" and not fid["rebuilt_differs"], df.attrs["verdict"]
    else:
        assert fid["faithful"] and set(fid["rebuilt_differs"]) == {"rows"}, df.attrs["verdict"]
    assert ip.user_ns["flor"].get_run("rw" + str(len(seed))).state["setup_digests"]["rows"][2] == "v2"


DATA = ("torch.manual_seed(3)\nX = torch.randn(96, 6); y = (X[:, 0] > 0).long()\n"
        "from torch.utils.data import TensorDataset, DataLoader\n"
        "g = torch.Generator().manual_seed(5)\n"
        "train_dl = DataLoader(TensorDataset(X, y), batch_size=32, shuffle=True, generator=g)\n"
        "{seed}Xv = torch.randn(32, 6)\nval_dl = DataLoader(TensorDataset(Xv, (Xv[:, 0] > 0).long()), batch_size=16)\n")
EVERY_TENTH = """
for epoch in range(4):
    for xb, yb in train_dl:
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(); loss.backward(); opt.step()
        flor.log("loss", loss.item())
    if epoch % 10 == 9:  # never in these 4 epochs: the recording's logs do not show the validation set
        print(sum(F.cross_entropy(model(a), b).item() for a, b in val_dl))
"""


@pytest.mark.parametrize("seed", ["torch.manual_seed(time.time_ns() % 2 ** 31)\n", "torch.manual_seed(4)\n"])
def test_a_dataset_the_recorded_cell_reads_is_compared_when_rebuilt(ip, seed):
    """DataLoaders and Datasets are rebuilt by re-running their cells, not restored. A validation set from an
    unseeded draw, which the recorded cell reads but never used in the epochs recorded, came back as another set
    in a replay, and a probe evaluating it said "Faithful". Its contents are now compared (not the loader's
    generator, whose state is restored: the training loader below was iterated by an earlier plain run, so its
    generator moved on, and that is no difference)."""
    probe = _val_probe(EVERY_TENTH, "    if epoch % 10", "sum(F.cross_entropy(model(a), b).item() for a, b in val_dl)")
    plain = EVERY_TENTH.replace("range(4)", "range(1)")  # a first, plain run: train_dl's generator moves on
    df = _replayed(ip, "dv", [DATA.format(seed=seed), MODEL, plain], EVERY_TENTH, probe)
    fid = df.attrs["fidelity"]
    if "time_ns" in seed:
        assert fid["faithful"] and fid["level"] == "caveats", df.attrs["verdict"]
        assert set(fid["rebuilt_differs"]) == {"val_dl"}, df.attrs["verdict"]
        assert "NOT the recording's value, read by the replayed code: val_dl (re-running In[" in df.attrs["verdict"]
    else:
        assert fid["level"] == "faithful" and not fid["rebuilt_differs"], df.attrs["verdict"]


OWN_GENERATOR = DATA.format(seed="") + "vg = torch.Generator().manual_seed(7)\n" + \
    "val_dl = DataLoader(TensorDataset(Xv, (Xv[:, 0] > 0).long()), batch_size=8, shuffle=True, generator=vg)\n"
FIRST_BATCH = """    a, b = next(iter(val_dl))  # a shuffled batch: val_dl's own generator moves on
    model.eval()
    with torch.no_grad():
        flor.log("val1", F.cross_entropy(model(a), b).item())
    model.train()
"""


FOREVER = DATA.format(seed="") + "def forever(dl):\n    while True:\n        yield from dl\n" + \
    "val_dl.generator = torch.Generator().manual_seed(1)  # a new pass draws its seed here, not from the global RNG\n" + \
    "val_batches = forever(val_dl)\n"


@pytest.mark.parametrize("name, cells, draw, moved", [
    # one shuffled batch of a validation loader with a generator of its own, which training never reads
    ("og", OWN_GENERATOR, "next(iter(val_dl))", "val_dl"),
    # the next batch of a Python generator over the loader: opaque to pickle, it was digested by its type alone
    ("pg", FOREVER, "next(val_batches)", "val_batches"),
])
def test_a_probe_advancing_a_value_of_its_own_is_told_when_the_replay_starts_past_epoch_0(ip, store, name, cells,
                                                                                            draw, moved):
    """No checkpoint holds what only the probe moves: a replay of epoch 3 drew from it as the cells made it, where a
    run with the probe from the start had drawn from it in epochs 0-2 too. It said "Faithful" with another value
    (for a Python generator too, once a loader's generator was watched: its digest was its type). It now says
    which values may differ and how to get them; replayed from epoch 0 in one worker, they equal that run's."""
    code = EVERY_TENTH.replace("range(4)", "range(5)").split("    if epoch % 10")[0]  # val_dl is not read
    probe = code + FIRST_BATCH.replace("next(iter(val_dl))", draw)
    df = _replayed(ip, name, [cells, MODEL], code, probe, epochs="3")
    fid = df.attrs["fidelity"]
    assert fid["faithful"] and fid["level"] == "caveats", df.attrs["verdict"]
    assert fid["probe_changed"]["names"] == {moved: "changed"}, fid["probe_changed"]
    assert "NOT necessarily what a run with these probes from the start would have logged in epoch 3: the probes " \
           f"change {moved}" in df.attrs["verdict"] and "--epochs 0-3 --workers 1" in df.attrs["verdict"]
    exact = run(ip, f"%%flor replay {name} --epochs 0-3 --workers 1 --no-progress\n" + probe)
    assert exact.attrs["fidelity"]["level"] == "faithful", exact.attrs["verdict"]
    run(ip, cells)
    run(ip, MODEL)
    run(ip, f"%%flor record --name {name}_truth --no-progress\n" + probe)
    want = flor.dataframe("val1", run=f"{name}_truth", store=store)
    got = exact.dropna(subset=["val1"])
    assert got["val1"].tolist() == want[want["epoch"] <= 3]["val1"].tolist() and len(got) == 4
    assert df.dropna(subset=["val1"])["val1"].tolist() != want[want["epoch"] == 3]["val1"].tolist()


def test_probes_after_the_epoch_loop_run_on_the_state_training_left(ip, store):
    """A probe added after the epoch loop (a final evaluation) never ran in a replay and logged nothing, without a
    word. Now the segment ending at the recording's last epoch runs the cell's lines after the loop; what they log
    has no epoch, a recorded final metric is compared, and a replay of earlier epochs runs the last one too."""
    tail = "acc = (model(X).argmax(1) == y).float().mean().item()\nflor.log('final_acc', acc)\n"
    probe = "flor.log('final_loss', F.cross_entropy(model(X), y).item())\n"
    run(ip, SETUP)
    run(ip, MODEL)
    run(ip, "%%flor record --name tl --no-progress\n" + TRAIN + tail)
    df = run(ip, "%%flor replay tl --epochs 1 --no-progress\n" + TRAIN + tail + probe)
    fid = df.attrs["fidelity"]
    assert fid["level"] == "faithful" and fid["tail"]["ran"], df.attrs["verdict"]
    assert "final_acc exact (1 value)" in df.attrs["verdict"], df.attrs["verdict"]
    assert "run after epoch 3, on the state training left, so the replay runs epoch 3 too" in fid["plan"], fid["plan"]
    last = df[df["epoch"].isna()]
    assert len(last) == 1 and df.index[-1] == last.index[0] and set(df["epoch"].dropna()) == {1, 3}
    run(ip, SETUP)
    run(ip, MODEL)
    run(ip, "%%flor record --name tl_truth --no-progress\n" + TRAIN + tail + probe)
    want = flor.dataframe("final_loss", run="tl_truth", store=store)
    assert last["final_loss"].tolist() == want["final_loss"].dropna().tolist() and len(want["final_loss"].dropna()) == 1
    again = flor.api.last_result("tl", store)  # what the panel shows after a restart
    assert again[again["epoch"].isna()]["final_loss"].tolist() == want["final_loss"].dropna().tolist()
    # Left by `break` (early stopping): what the lines after the loop log has no epoch, when recorded as in a replay.
    stop = TRAIN.replace('    flor.log("last", history[-1])\n', '    flor.log("last", history[-1])\n    if epoch == 2:\n'
                         '        break\n')
    run(ip, SETUP)
    run(ip, MODEL)
    run(ip, "%%flor record --name tl_break --no-progress\n" + stop + tail)
    rec = flor.dataframe("final_acc", run="tl_break", store=store).dropna(subset=["final_acc"])
    assert len(rec) == 1 and rec["epoch"].isna().all(), rec  # it was stored as epoch 2's
    df = run(ip, "%%flor replay tl_break --epochs 1 --no-progress\n" + stop + tail + probe)
    assert "final_acc exact (1 value)" in df.attrs["verdict"] and df.attrs["fidelity"]["tail"]["ran"], \
        df.attrs["verdict"]
    assert df[df["epoch"].isna()]["final_loss"].notna().sum() == 1
    # A recording that did not finish its loop has no state "after training": said, not silently skipped.
    run(ip, SETUP)
    run(ip, MODEL)
    with pytest.raises(RuntimeError):
        run(ip, "%%flor record --name tl_failed --no-progress\n" + TRAIN.replace(
            "    history.append", "    if epoch == 2: raise RuntimeError('stop')\n    history.append") + tail)
    df = run(ip, "%%flor replay tl_failed --epochs 1 --no-progress\n" + TRAIN.replace(
        "    history.append", "    if epoch == 2: raise RuntimeError('stop')\n    history.append") + tail + probe)
    assert "do not run: the recording did not finish its loop (it is failed)" in df.attrs["verdict"], \
        df.attrs["verdict"]
    assert "final_loss" not in df


def test_probes_before_the_epoch_loop_log_from_the_worker_that_starts_at_epoch_0(ip, store):
    """A probe added before the epoch loop (the model before training) logged nothing in a replay, without a word.
    The worker starting at epoch 0 now keeps what such lines log (no epoch, as recorded) and checks that they ran
    on the recording's state at the loop's start; a replay of later epochs runs epoch 0 too. Where an earlier
    training the replay does not run again left the model trained, it says the values may differ."""
    probe = "flor.log('w0', float(model[0].weight.sum()))\n"
    run(ip, SETUP)
    run(ip, MODEL)
    run(ip, "%%flor record --name hd --no-progress\n" + TRAIN)
    df = run(ip, "%%flor replay hd --epochs 2 --no-progress\n" + probe + TRAIN)
    fid = df.attrs["fidelity"]
    assert fid["level"] == "faithful" and fid["head"] == {"ran": True, "checked": True, "differs": []}, df.attrs["verdict"]
    assert "log from the worker that starts at epoch 0, so the replay runs epoch 0 too" in fid["plan"], fid["plan"]
    first = df[df["epoch"].isna()]
    run(ip, SETUP)
    run(ip, MODEL)
    run(ip, "%%flor record --name hd_truth --no-progress\n" + probe + TRAIN)
    want = flor.dataframe("w0", run="hd_truth", store=store)["w0"].dropna().tolist()
    assert first["w0"].tolist() == want and len(want) == 1
    # An earlier training, not run again in a replay (its values come from the checkpoint): the model the lines
    # before the loop see in the worker is not the recording's.
    run(ip, SETUP)
    run(ip, MODEL)
    run(ip, TRAIN)
    run(ip, "%%flor record --name hd_later --no-progress\n" + TRAIN)
    df = run(ip, "%%flor replay hd_later --epochs 1 --no-progress\n" + probe + TRAIN)
    fid = df.attrs["fidelity"]
    assert fid["head"]["ran"] and "obj/model" in fid["head"]["differs"], df.attrs["verdict"]
    assert "The lines added before the epoch loop ran on a state other than the recording's" in df.attrs["verdict"]


def test_a_value_a_function_holds_is_compared_when_rebuilt(ip):
    """A validation set only a function holds (a default argument; a factory's closure is the same): functions are
    code, so it was never digested, and a probe calling it on an unseeded set said "Faithful"."""
    setup = SETUP + ("torch.manual_seed(time.time_ns() % 2 ** 31)\nXv = torch.randn(32, 6)\n"
                     "def evaluate(m, data=(Xv, (Xv[:, 0] > 0).long())):\n"
                     "    return F.cross_entropy(m(data[0]), data[1]).item()\ndel Xv\n")
    df = _replayed(ip, "fh", [setup, MODEL], TRAIN, _val_probe(TRAIN, "    history.append", "evaluate(model)"))
    fid = df.attrs["fidelity"]
    assert fid["level"] == "caveats" and set(fid["rebuilt_differs"]) == {"evaluate"}, df.attrs["verdict"]
    assert "made evaluate() hold other values than the recording's" in df.attrs["verdict"]


def test_a_probe_that_draws_random_numbers_leaves_training_as_recorded(ip, store):
    """The model has dropout: a probe drawing from torch's global generator shifted every later mask, and the
    replay said a probe changed training. Its draws are now undone after it (probe_rng), so training is the
    recorded one and the probe's values are those of a run that had it from the start, its draws undone there
    by hand with torch.random.fork_rng()."""
    noise = '        flor.log("noise", torch.randn(1).item())\n'
    run(ip, SETUP)
    run(ip, MODEL)
    run(ip, "%%flor record --name draws --no-progress\n" + TRAIN)
    probe = TRAIN.replace('        flor.log("loss", loss.item())\n', '        flor.log("loss", loss.item())\n' + noise)
    df = run(ip, "%%flor replay draws --epochs 2-3 --no-progress\n" + probe)
    assert df.attrs["fidelity"]["level"] == "faithful", df.attrs["verdict"]
    run(ip, SETUP)
    run(ip, MODEL)
    truth = TRAIN.replace('        flor.log("loss", loss.item())\n', '        flor.log("loss", loss.item())\n'
                          '        with torch.random.fork_rng():\n    ' + noise)
    run(ip, "%%flor record --name truth --no-progress\n" + truth)
    want = flor.dataframe("noise", run="truth", store=store)
    want = want[want["epoch"].isin([2, 3])]["noise"].tolist()
    assert len(want) == 6 and df["noise"].dropna().tolist() == want, (df["noise"].dropna().tolist(), want)


def test_a_value_too_large_to_digest_at_record_is_named_as_not_compared_when_a_probe_reads_it(ip, monkeypatch):
    import flor_nb.setup_check

    monkeypatch.setattr(flor_nb.setup_check, "BUDGET_S", 0.0)  # as if Xv were too large for record's time budget
    run(ip, SETUP + "Xv = torch.randn(32, 6); yv = (Xv[:, 0] > 0).long()\n")
    run(ip, MODEL)
    run(ip, "%%flor record --name big --no-progress\n" + TRAIN)
    probe = TRAIN.replace("    history.append", "    flor.log('xv', float(Xv.sum()))\n    history.append")
    df = run(ip, "%%flor replay big --epochs 2 --no-progress\n" + probe)
    assert df.attrs["fidelity"]["level"] == "caveats", df.attrs["verdict"]
    assert "Not compared with the recording, read by the replayed code: Xv (not compared" not in df.attrs["verdict"]
    assert "Not compared with the recording, read by the replayed code: Xv (rebuilt by re-running In[" in \
        df.attrs["verdict"], df.attrs["verdict"]


FIRST = """
losses = []
for epoch in range(4):
    for i in range(0, 96, 32):
        loss = F.cross_entropy(model(X[i:i + 32]), y[i:i + 32])
        opt.zero_grad(); loss.backward(); opt.step()
    losses.append(loss.item())
    with open(MARK, "a") as f:
        f.write("x")
"""
MORE = """
for epoch in range(4, 7):
    for i in range(0, 96, 32):
        loss = F.cross_entropy(model(X[i:i + 32]), y[i:i + 32])
        opt.zero_grad(); loss.backward(); opt.step()
        flor.log("loss", loss.item())
    losses.append(loss.item())
"""


@pytest.mark.parametrize("later", ["", "best = min(losses)\n"])
def test_an_earlier_training_cell_is_not_trained_again_in_a_replay_unless_a_later_cell_needs_it(ip, tmp_path, later,
                                                                                                capsys):
    """Train, then train more in a %%flor record cell that appends to the first cell's ``losses``: the first cell
    is a dependency, and every replay trained it again (hours, in a real notebook). Its values are in the
    checkpoint: the replay runs only what precedes its loop, unless a later cell reads what it bound."""
    mark = tmp_path / "epochs-trained.txt"
    run(ip, SETUP + f"MARK = {str(mark)!r}\n")
    run(ip, MODEL)
    run(ip, FIRST)
    run(ip, later + "opt = torch.optim.SGD(model.parameters(), lr=0.05)\n")
    run(ip, "%%flor record --name more --no-progress\n" + MORE)
    assert mark.read_text() == "xxxx"
    want = list(ip.user_ns["losses"])
    capsys.readouterr()
    probe = MORE.replace("    losses.append", "    flor.log('seen', list(losses))\n    losses.append")
    df = run(ip, "%%flor replay more --epochs 1-2 --no-progress\n" + probe)
    assert df.attrs["fidelity"]["level"] == "faithful", df.attrs["verdict"]
    assert df["seen"].dropna().tolist() == [want[:5], want[:6]]
    said = "In[3] is an earlier training: not run again" in capsys.readouterr().out
    assert (mark.read_text(), said) == (("xxxx", True) if not later else ("xxxxxxxx", False))


def test_a_run_recorded_before_rebuilt_values_were_digested_says_it_did_not_compare_them(ip, store):
    run(ip, SETUP + "Xv = torch.randn(32, 6)\n")
    run(ip, MODEL)
    run(ip, "%%flor record --name old --no-progress\n" + TRAIN)
    recorded = store.find_run("old")
    store.update_run(recorded.id, state={k: v for k, v in recorded.state.items() if k != "setup_digests"})
    probe = TRAIN.replace("    history.append", "    flor.log('xv', float(Xv.sum()))\n    history.append")
    df = run(ip, "%%flor replay old --epochs 2 --no-progress\n" + probe)
    assert df.attrs["fidelity"]["level"] == "caveats", df.attrs["verdict"]
    assert "Not compared with the recording, read by the replayed code: Xv (rebuilt by re-running In[1]; this run " \
           "was recorded before flor_nb kept what to compare it with)" in df.attrs["verdict"], df.attrs["verdict"]
    df = run(ip, "%%flor replay old --epochs 2 --no-progress\n" + TRAIN)  # reading none of them: nothing to say
    assert df.attrs["fidelity"]["level"] == "faithful", df.attrs["verdict"]


def test_an_uncapturable_value_made_after_an_earlier_training_is_listed_without_a_warning(ip, recwarn):
    """Captured only because a probe may read it: the recorded cell never does, so no NotCapturedWarning; it is
    still listed with the run, and a replay that reads it says so."""
    run(ip, SETUP)
    run(ip, MODEL + "import threading\n")
    run(ip, TRAIN.replace("flor.log", "print").replace("range(4)", "range(2)"))
    run(ip, "lock = threading.Lock()\nopt = torch.optim.SGD(model.parameters(), lr=0.05)\n")
    run(ip, "%%flor record --name q --no-progress\n" + TRAIN)
    assert not [w for w in recwarn if "not captured" in str(w.message)], [str(w.message) for w in recwarn]
    assert "lock" in ip.user_ns["flor"].get_run("q").state["not_captured"]
    probe = TRAIN.replace("    history.append", "    flor.log('locked', lock.locked())\n    history.append")
    df = run(ip, "%%flor replay q --epochs 2 --no-progress\n" + probe)
    assert "Not captured but read by the replayed code: lock (" in df.attrs["verdict"], df.attrs["verdict"]


def test_a_cell_after_an_earlier_training_that_reads_its_model_keeps_that_training_whole(ip, tmp_path):
    """``baseline = loss(model)`` after the first training, which the recorded cell continues: cutting that
    training short would give ``baseline`` the untrained model's loss (named by the digest check, but wrong), so
    the replay runs it in full and the probe gets the recorded value."""
    mark = tmp_path / "epochs-trained.txt"
    run(ip, SETUP + f"MARK = {str(mark)!r}\n")
    run(ip, MODEL)
    run(ip, FIRST)
    run(ip, "baseline = F.cross_entropy(model(X), y).item()\nopt = torch.optim.SGD(model.parameters(), lr=0.05)\n")
    run(ip, "%%flor record --name more --no-progress\n" + MORE)
    baseline = ip.user_ns["baseline"]
    probe = MORE.replace("    losses.append", "    flor.log('base', baseline)\n    losses.append")
    df = run(ip, "%%flor replay more --epochs 1 --no-progress\n" + probe)
    assert df.attrs["fidelity"]["level"] == "faithful", df.attrs["verdict"]
    assert df["base"].dropna().tolist() == [baseline] and mark.read_text() == "xxxxxxxx"


def test_a_training_loop_calling_a_helper_that_trains_the_global_model_is_kept_whole(ip, tmp_path):
    """The same as above, with the model trained inside a helper that reads it as a global: the loop's own text
    never names ``model``, the helper does."""
    mark = tmp_path / "epochs-trained.txt"
    run(ip, SETUP + f"MARK = {str(mark)!r}\n")
    run(ip, MODEL + "sched = torch.optim.lr_scheduler.StepLR(opt, 10)\ndef step(i):\n    loss = F.cross_entropy(model(X[i:i + 32]), y[i:i + 32])\n"
                    "    opt.zero_grad(); loss.backward(); opt.step()\n    return loss\n")
    run(ip, FIRST.replace("        loss = F.cross_entropy(model(X[i:i + 32]), y[i:i + 32])\n"
                          "        opt.zero_grad(); loss.backward(); opt.step()\n",
                          "        loss = step(i)\n    sched.step()\n"))
    run(ip, "baseline = F.cross_entropy(model(X), y).item()\nopt = torch.optim.SGD(model.parameters(), lr=0.05)\n")
    run(ip, "%%flor record --name more --no-progress\n" + MORE)
    baseline = ip.user_ns["baseline"]
    probe = MORE.replace("    losses.append", "    flor.log('base', baseline)\n    losses.append")
    df = run(ip, "%%flor replay more --epochs 1 --no-progress\n" + probe)
    assert df.attrs["fidelity"]["level"] == "faithful", df.attrs["verdict"]
    assert df["base"].dropna().tolist() == [baseline] and mark.read_text() == "xxxxxxxx"
