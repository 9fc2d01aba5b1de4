"""The whole loop on CUDA: record with dropout and AMP, replay in fresh worker processes, replay GPU -> CPU.

Skipped where CUDA is absent (CI). Run on an NVIDIA H100 with bench/gpu_check.sh (bench/results-gpu.md).
"""
from __future__ import annotations

import pandas as pd
import pytest
import torch

import flor_nb as flor
from flor_nb import checkpoint, devices, state, verdict

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SETUP = '''
import warnings
import torch, torch.nn as nn, torch.nn.functional as F
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # CUDA may already run in the test process: the cuBLAS note is moot
    flor.deterministic()
torch.manual_seed(0)
device = DEVICE if torch.cuda.is_available() else "cpu"
X = torch.randn(512, 20, device=device); y = (X[:, 0] + X[:, 1] > 0).long()
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 2)).to(device)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
scaler = torch.amp.GradScaler("cuda", enabled=device != "cpu")
'''

TRAIN = '''
for epoch in range(EPOCHS):
    model.train()
    perm = torch.randperm(X.shape[0], device=device)  # drawn from the CUDA generator
    for i in range(0, X.shape[0], 64):
        idx = perm[i:i + 64]
        with torch.autocast(device_type="cuda" if device != "cpu" else "cpu", dtype=torch.float16,
                            enabled=device != "cpu"):
            loss = F.cross_entropy(model(X[idx]), y[idx])  # dropout: CUDA random draws
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        flor.log("loss", loss.item())
    flor.log("scale", scaler.get_scale())
'''

PROBED = TRAIN.replace(
    "        flor.log(\"loss\", loss.item())\n",
    "        flor.log(\"loss\", loss.item())\n"
    "        flor.log(\"gn\", float(sum(p.grad.float().norm() ** 2 for p in model.parameters()\n"
    "                                 if p.grad is not None)))\n",
) + "    flor.log(\"wn\", float(sum(p.detach().norm() ** 2 for p in model.parameters())))\n"
PROBES = ["gn", "wn"]


def _record(store, name, code, device="cuda:0", epochs=4):
    ns = {"flor": flor, "EPOCHS": epochs, "DEVICE": device}
    exec(SETUP, ns)
    return flor.record(code, name=name, namespace=ns, cells=[f"EPOCHS = {epochs}\nDEVICE = {device!r}\n{SETUP}"],
                       store=store, overhead=float("inf"))


def _values(frame, epochs):
    out = {}
    for _, row in frame.iterrows():
        if int(row["epoch"]) in epochs:
            for n in PROBES:
                v = row.get(n)
                if v is not None and v == v:
                    out[(n, int(row["epoch"]), None if pd.isna(row["step"]) else int(row["step"]))] = v
    return out


@pytest.fixture(autouse=True)
def _restore_flags():
    """flor.deterministic() in the recorded cells changes process-wide settings: put them back."""
    before = devices.flags()
    yield
    devices.apply_flags(before)


@pytest.fixture
def recorded(store):
    return _record(store, "gpu", TRAIN)


def test_checkpoints_hold_the_gpu_state(recorded, store):
    ck = store.checkpoints(recorded.id)[1]
    snap = checkpoint.read(store.home, ck["path"])
    assert snap["python"]["devices"]["obj/model"] == "cuda:0"
    assert len(snap["tensors"]["rng/cuda"]) == torch.cuda.device_count()
    assert snap["python"]["devflags"]["deterministic_algorithms"] is True
    assert recorded.env["gpu"]["cuda_available"] and recorded.env["gpu"]["devices"]


def test_replay_on_the_gpu_equals_probes_from_the_start(recorded, store):
    truth = _record(store, "truth", PROBED)
    want = _values(flor.dataframe(*PROBES, run=truth.label, store=store), {1, 3})
    df = flor.replay("gpu", code=PROBED, epochs="1,3", store=store)  # in fresh worker processes
    fid = df.attrs["fidelity"]
    assert fid["level"] == verdict.FAITHFUL and fid["tolerance"] is None, df.attrs["verdict"]
    assert fid["metrics"]["loss"]["verdict"] == "exact" and fid["metrics"]["scale"]["verdict"] == "exact"
    assert _values(df, {1, 3}) == want and want


def test_replay_gpu_run_on_the_cpu_says_it_compares_by_tolerance(recorded, store):
    df = flor.replay("gpu", code=PROBED, epochs="2", store=store, device="cpu")
    fid, text = df.attrs["fidelity"], df.attrs["verdict"]
    assert fid["tolerance"] and any("cuda:0 -> cpu" in r for r in fid["tolerance"]["reasons"]), text
    assert "a probe changed training" not in text and "tolerance" in text
    assert "device: cuda:0 -> cpu" in fid["tolerance"]["mapped"]  # the recorded `device` variable follows the map
    # CUDA draws (dropout, randperm) have no CPU counterpart: said as a reason, not found as a divergence
    assert any("generator" in r for r in fid["tolerance"]["reasons"])
    assert _values(df, {2})  # the probes ran, on the CPU


def test_snapshot_goes_to_pinned_host_memory_without_a_gpu_copy():
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)]).cuda()  # 32 MB
    model(torch.ones(4, 1024, device="cuda")).sum().backward()
    ns = {"__name__": "__main__", "model": model}
    cap = state.Capturer(ns, state.Scope(assigned={"model"}, free=set()))
    pool = state.BufferPool()
    expected = model[0].weight.detach().cpu()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    snap = cap.snapshot(pool=pool)
    grew = torch.cuda.memory_allocated() - before
    assert grew < 4 * 1024 * 1024 + 1, f"GPU memory grew by {grew} bytes during a snapshot"
    w = snap["tensors"]["obj/model"]["0.weight"]
    assert w.device.type == "cpu" and w.is_pinned() and snap["events"]
    with torch.no_grad():
        model[0].weight.add_(1.0)  # training goes on at once: ordered after the copy on the GPU
    state.wait_copies(snap)
    assert torch.equal(w, expected)  # the snapshot holds the value before the update, never the live one
    assert torch.equal(snap["tensors"]["grad/model"]["3.weight"], model[3].weight.grad.cpu())

    def buffers(s):
        return {t.data_ptr() for key in ("obj/model", "grad/model") for t in s["tensors"][key].values()}
    first = buffers(snap)
    pool.release(snap)
    again = cap.snapshot(pool=pool)
    state.wait_copies(again)
    assert buffers(again) == first  # the pinned buffers are reused, none allocated again


@pytest.mark.parametrize("piece", [1 << 20, 32 << 20])
def test_gpu_tensors_hash_through_the_pinned_buffer_as_their_cpu_copies_do(monkeypatch, piece):
    from flor_nb import tensor_bytes
    from flor_nb.checkpoint import tensor_digests
    from flor_nb.hashing import hash_bytes

    monkeypatch.setattr(tensor_bytes, "STAGE_BYTES", piece)  # 1 MiB: a 12 MB tensor goes in 12 pieces
    g = torch.Generator(device="cuda").manual_seed(0)
    tensors = {"big": torch.randn(3_000_000, device="cuda", generator=g),
               "strided": torch.randn(700, 1000, device="cuda", generator=g).t(),
               "bf16": torch.randn(4097, device="cuda", generator=g).bfloat16(),
               "mask": torch.rand(999, device="cuda", generator=g) > 0.5,
               "empty": torch.empty(0, 3, device="cuda"), "scalar": torch.tensor(7, device="cuda")}
    for name, t in tensors.items():
        assert tensor_bytes.hash_tensor(t, "xxh3_128") == hash_bytes(tensor_bytes._raw(t.cpu())), name
    on_cpu = {"obj/x": {k: t.cpu() for k, t in tensors.items()}}
    assert tensor_digests({"obj/x": tensors}) == tensor_digests(on_cpu)
    monkeypatch.setattr(tensor_bytes, "STAGED", False)
    assert tensor_digests({"obj/x": tensors}) == tensor_digests(on_cpu)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_model_on_the_second_gpu_records_and_replays_there(store):
    run = _record(store, "second", TRAIN, device="cuda:1")
    snap = checkpoint.read(store.home, store.checkpoints(run.id)[1]["path"])
    assert snap["python"]["devices"]["obj/model"] == "cuda:1"
    df = flor.replay("second", code=PROBED, epochs="2", store=store)
    assert df.attrs["fidelity"]["level"] == verdict.FAITHFUL, df.attrs["verdict"]


NB_SETUP = (
    "flor.deterministic()\n"
    "import torch, torch.nn as nn, torch.nn.functional as F\n"
    "torch.manual_seed(0)\n"
    "device = 'cuda' if torch.cuda.is_available() else 'cpu'\n"
    "X = torch.randn(256, 8, device=device); y = (X[:, :2].sum(1) > 0).long()\n"
    "model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 2)).to(device)\n"
    "opt = torch.optim.Adam(model.parameters(), lr=1e-2)\n"
    "scaler = torch.amp.GradScaler('cuda', enabled=device == 'cuda')"
)
NB_LOOP = (
    "for epoch in range(3):\n"
    "    perm = torch.randperm(256, device=device)\n"
    "    for i in range(0, 256, 64):\n"
    "        with torch.autocast('cuda', dtype=torch.float16, enabled=device == 'cuda'):\n"
    "            loss = F.cross_entropy(model(X[perm[i:i+64]]), y[perm[i:i+64]])\n"
    "        opt.zero_grad(); scaler.scale(loss).backward()\n"
    "{probe}"
    "        scaler.step(opt); scaler.update()\n"
    "        flor.log('loss', loss.item())"
)
NB_PROBE = "        flor.log('w_grad', model[0].weight.grad.float().abs().sum().item())\n"


@pytest.mark.timeout(600)
def test_notebook_record_on_gpu_then_replay_in_a_fresh_kernel_on_gpu_and_cpu(store, tmp_path):
    import nbformat

    from test_notebooks import execute, text

    new, cell = nbformat.v4.new_notebook, nbformat.v4.new_code_cell
    execute(new(cells=[cell("%load_ext flor_nb"), cell(NB_SETUP),
                       cell("%%flor record --name gpu_nb --no-progress\n" + NB_LOOP.format(probe=""))]), tmp_path)
    probed = NB_LOOP.format(probe=NB_PROBE)
    nb = execute(new(cells=[cell("%load_ext flor_nb"),
                            cell("%%flor replay gpu_nb --epochs 1,2 --no-progress\n" + probed),
                            cell("%%flor replay gpu_nb --epochs 2 --device cpu --no-progress\n" + probed)]), tmp_path)
    on_gpu, on_cpu = text(nb.cells[1].outputs), text(nb.cells[2].outputs)
    assert "Faithful replay: recorded metrics reproduced exactly: loss exact (8 values)" in on_gpu, on_gpu
    assert "w_grad" in on_gpu and "w_grad" in on_cpu
    assert "cuda:0 -> cpu" in on_cpu and "tolerance" in on_cpu and "a probe changed training" not in on_cpu, on_cpu


def test_gpu_checkpoints_are_written_by_the_saver_process(recorded):
    saver = recorded.timings["saver"]
    assert saver["why_not"] is None and saver["process"] >= 4, saver


def test_shared_snapshot_buffers_are_page_locked_for_cuda_copies(monkeypatch):
    from flor_nb import shared_buffers

    shared = shared_buffers.SharedBuffers()
    pool = state.BufferPool(pin_memory=True, shared=shared)
    src = torch.randn(1 << 20, device="cuda")
    buf = pool.copy(src)
    for event in pool.seal():
        event.synchronize()
    assert shared.pin_failed is None, shared.pin_failed
    assert shared.ref(buf) is not None and buf.is_pinned()
    assert torch.equal(buf, src.cpu())
    monkeypatch.setattr(shared_buffers, "KEEP_PINNED_BYTES", 0)
    assert len(pool.close()) == 1  # dropped: unregistered before its pages go
    del buf
    assert float((src * 2).sum()) == float(src.sum()) * 2  # CUDA still fine after the unregister
