"""Device-agnostic logic of GPU support, tested where there is no GPU (see test_gpu.py for the CUDA loop).

Recorded devices are simulated: checkpoint metadata naming ``cuda:1``, the ``meta`` device standing in
for a device other than the CPU, duck-typed tensors for staging decisions.
"""
from __future__ import annotations

import os
import types

import pytest
import torch

import flor_nb as flor
from conftest import SETUP, TRAIN, setup_namespace
from flor_nb import checkpoint, devices, state, verdict
from flor_nb.devices import DeviceError, DeviceMap


@pytest.fixture(autouse=True)
def _restore_flags():
    """Tests here change process-wide settings: put them back."""
    before, env = devices.flags(), os.environ.get(devices.CUBLAS)
    yield
    devices.apply_flags(before)
    if env is None:
        os.environ.pop(devices.CUBLAS, None)
    else:
        os.environ[devices.CUBLAS] = env


# -- settings ------------------------------------------------------------------------------------------
def test_deterministic_sets_the_recipe_and_says_what_was_before():
    before = flor.deterministic()
    now = devices.flags()
    assert before["deterministic_algorithms"] is False and before["cudnn_deterministic"] is False
    assert now["deterministic_algorithms"] and now["cudnn_deterministic"] and not now["cudnn_benchmark"]
    assert now["cublas_workspace_config"] == ":4096:8" and os.environ[devices.CUBLAS] == ":4096:8"
    assert now["float32_matmul_precision"] == "highest"
    assert now.get("cuda.matmul.fp32_precision", "ieee") == "ieee"  # TF32 off (new API where this torch has it)
    assert now["matmul_allow_tf32"] in (False, None)
    assert devices.nondeterministic(now) == []


def test_recorded_flags_are_reapplied():
    recorded = {**devices.flags(), "deterministic_algorithms": True, "cudnn_benchmark": True,
                "cublas_workspace_config": ":16:8"}
    assert devices.apply_flags(recorded) == []
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    assert os.environ[devices.CUBLAS] == ":16:8"
    assert devices.flags() == recorded


def test_nondeterministic_settings_are_named():
    default = {"deterministic_algorithms": False, "cudnn_deterministic": False, "cudnn_benchmark": False}
    reasons = devices.nondeterministic(default)
    assert any("use_deterministic_algorithms" in r for r in reasons)
    assert any("benchmark=True" in r for r in devices.nondeterministic({**default, "cudnn_benchmark": True}))
    assert devices.nondeterministic(None)  # unknown settings are never taken as deterministic


def test_snapshots_carry_the_settings_and_restore_puts_them_back():
    ns = {"__name__": "__main__", "w": torch.ones(3)}
    cap = state.Capturer(ns, state.Scope(assigned={"w"}, free=set()))
    snap = cap.snapshot()
    assert snap["python"]["devflags"] == devices.flags() and "devflags" in snap["digests"]
    before = cap.digests()["devflags"]
    torch.backends.cudnn.benchmark = True  # a cell that turns autotuning on mid-run changes the stream
    assert cap.digests()["devflags"] != before
    cap.restore(snap)
    assert torch.backends.cudnn.benchmark is False


def test_a_cuda_run_without_the_recipe_is_told_once_and_other_generators_are_listed():
    default = {"deterministic_algorithms": False, "cudnn_deterministic": False, "cudnn_benchmark": False}
    note = devices.recording_note({"obj/model": "cuda:1"}, default)
    assert "without torch.use_deterministic_algorithms(True)" in note and "flor.deterministic()" in note
    assert devices.recording_note({"obj/opt": ["cpu", "cuda:0"]}, default)
    assert devices.recording_note({"obj/model": "cuda:0"}, {**default, "deterministic_algorithms": True,
                                                           "cudnn_deterministic": True}) is None
    assert devices.recording_note({"val/m": "meta"}, default) is None and devices.recording_note({}, default) is None
    assert sorted(devices.uncaptured({"val/x": "mps:0", "obj/o": ["cpu", "xla:0"], "val/y": "cuda:0"})) == \
        ["<mps RNG>", "<xla RNG>"]


# -- where tensors go ----------------------------------------------------------------------------------
def test_device_map():
    assert DeviceMap().device("cuda:1") == torch.device("cuda:1") and not DeviceMap()
    assert DeviceMap("cpu").device("cuda:1") == torch.device("cpu")
    m = DeviceMap({"cuda:1": "cuda:0"})
    assert m.device("cuda:1") == torch.device("cuda:0") and m.device("cuda:2") == torch.device("cuda:2")
    assert DeviceMap({"cuda": "cpu"}).device("cuda:3") == torch.device("cpu")
    assert DeviceMap("cpu").crosses(["cuda:1", "cpu"]) == [("cuda:1", "cpu")]
    assert m.crosses(["cuda:1"]) == []  # another GPU of the same kind is not another kind of device
    with pytest.raises(DeviceError, match="not a device"):
        DeviceMap("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_cuda_target_without_cuda_is_refused_with_the_way_out():
    with pytest.raises(DeviceError, match="device='cpu'"):
        devices.check_available(DeviceMap(), ["cuda:1"])
    with pytest.raises(DeviceError, match="no CUDA"):
        devices.check_available(DeviceMap("cuda"))
    devices.check_available(DeviceMap("cpu"), ["cuda:1"])  # mapped to the CPU: fine


def _snap_with(ns, assigned):
    cap = state.Capturer(ns, state.Scope(assigned=set(assigned), free=set()))
    return cap, cap.snapshot()


def test_restore_puts_tensors_on_their_recorded_device_through_the_map():
    ns = {"__name__": "__main__", "w": torch.arange(4.0), "n": 1}
    cap, snap = _snap_with(ns, ["w", "n"])
    assert snap["python"]["devices"] == {}  # all on the CPU: nothing to say
    # As if recorded on another device: "meta" stands in for a GPU here
    snap["python"]["devices"] = {"val/w": "meta"}
    ns["w"] = torch.zeros(4)
    cap.restore(snap)
    assert ns["w"].device.type == "meta"
    cap.device_map = DeviceMap("cpu")  # replay with device="cpu"
    cap.restore(snap)
    assert ns["w"].device.type == "cpu" and torch.equal(ns["w"], torch.arange(4.0))
    # The recorded device of a GPU never reaches torch on the CPU when it is mapped away
    snap["python"]["devices"] = {"val/w": "cuda:1"}
    cap.device_map = DeviceMap({"cuda:1": "cpu"})
    cap.restore(snap)
    assert ns["w"].device.type == "cpu"


def test_gradients_go_to_the_device_of_their_parameter():
    model = torch.nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    ns = {"__name__": "__main__", "model": model}
    cap, snap = _snap_with(ns, ["model"])
    meta = torch.nn.Linear(2, 2, device="meta")  # the replay's model lives on another device
    ns["model"] = meta
    state._restore_module(meta, "model", snap["tensors"], snap["python"])
    assert meta.weight.grad is not None and meta.weight.grad.device.type == "meta"
    assert meta.weight.grad.shape == model.weight.shape


def test_value_tensor_gradients_follow_the_tensor():
    w = torch.ones(3, requires_grad=True)
    (w * 2).sum().backward()
    ns = {"__name__": "__main__", "w": w}
    cap, snap = _snap_with(ns, ["w"])
    snap["python"]["devices"] = {"val/w": "meta", "valgrad/w": "meta"}
    ns["w"] = torch.zeros(3)
    cap.restore(snap)
    assert ns["w"].device.type == "meta" and ns["w"].grad.device.type == "meta" and ns["w"].requires_grad


def test_snapshot_records_devices_that_are_not_the_cpu():
    ns = {"__name__": "__main__", "w": torch.ones(2), "m": torch.empty(3, device="meta")}
    cap = state.Capturer(ns, state.Scope(assigned={"w", "m"}, free=set()))
    snap = cap.snapshot(copy=False)
    assert snap["python"]["devices"] == {"val/m": "meta"} and "devices" in snap["digests"]
    assert devices.tree_devices({"a": torch.ones(1, device="meta"), "b": [torch.ones(1)]}) == ["cpu", "meta"]
    assert devices.tree_devices({"a": 1}) is None


def test_generator_states_are_not_forced_across_devices():
    recorded = DeviceMap("cpu")
    assert devices.set_cuda_rng_states([torch.zeros(16, dtype=torch.uint8)] * 2, recorded) == ["cuda:0", "cuda:1"]
    assert devices.set_cuda_rng_states(None, recorded) == []


def test_a_model_the_cells_put_elsewhere_is_named():
    ns = {"model": torch.nn.Linear(2, 2, device="meta"), "other": torch.nn.Linear(2, 2)}
    notes = devices.misplaced(ns, list(ns), DeviceMap("cpu"))
    assert len(notes) == 1 and notes[0].startswith("model is on meta")
    assert devices.misplaced(ns, list(ns), DeviceMap()) == []
    assert devices.same_device(torch.device("cuda"), torch.device("cuda:1"))
    assert not devices.same_device(torch.device("cuda:0"), torch.device("cuda:1"))


def test_device_variables_follow_the_map():
    ns = {"device": torch.device("cuda:1"), "dev": "cuda", "name": "cudafoo", "k": 3, "other": "cuda:0"}
    changed = devices.map_device_values(ns, list(ns), DeviceMap("cpu"), used=["cuda:1"])
    assert ns["device"] == torch.device("cpu") and ns["dev"] == "cpu" and ns["name"] == "cudafoo"
    assert ns["other"] == "cuda:0"  # no recorded tensor lived there: not the training's device
    assert sorted(changed) == ["dev: cuda -> cpu", "device: cuda:1 -> cpu"]
    assert devices.map_device_values(ns, list(ns), DeviceMap()) == []


def test_a_cuda_name_in_a_cpu_run_stays_and_replay_is_exact(store):
    cells = [f"EPOCHS = 2\n{SETUP}\ndev = 'cuda:0'\n"]
    ns = setup_namespace(2)
    ns["dev"] = "cuda:0"
    code = TRAIN.replace("    model.eval()\n", "    model.eval()\n    note = dev\n")
    flor.record(code, name="named", namespace=ns, cells=cells, store=store, overhead=float("inf"))
    df = flor.replay("named", code=code, epochs="1", store=store, device="cpu")
    assert df.attrs["fidelity"]["level"] == verdict.FAITHFUL, df.attrs["verdict"]


def test_replay_context_hides_cuda_for_a_cpu_replay_and_sets_the_recorded_flags():
    real = torch.cuda.is_available
    with devices.replay_context("cpu", {**devices.flags(), "cudnn_benchmark": True}) as failed:
        assert torch.cuda.is_available() is False and torch.backends.cudnn.benchmark and failed == []
    assert torch.cuda.is_available is real
    with devices.replay_context(None, None):
        assert torch.cuda.is_available is real


# -- snapshots: staging and the pinned pool -------------------------------------------------------------
def _fake(device, layout=torch.strided, quantized=False):
    return types.SimpleNamespace(device=torch.device(device), layout=layout, is_quantized=quantized)


def test_staging_never_copies_on_the_gpu():
    assert devices.staging(torch.ones(2)) == "pool"
    assert devices.staging(torch.ones(2).to_sparse()) == "clone"
    assert devices.staging(torch.empty(2, device="meta")) == "clone"
    assert devices.staging(_fake("cuda:1")) == "pinned"
    assert devices.staging(_fake("cuda:0", layout=torch.sparse_coo)) == "host"
    assert devices.staging(_fake("cuda:0"), pinned_ok=False) == "host"
    assert devices.staging(_fake("mps")) == "host"


def test_pool_copies_into_reused_buffers_that_never_alias():
    pool = state.BufferPool(pin_memory=False)
    src = torch.arange(6.0).reshape(2, 3)
    a = pool.copy_async(src)
    assert torch.equal(a, src) and a.data_ptr() != src.data_ptr()
    src += 1  # training goes on: the snapshot keeps the value it copied
    assert torch.equal(a, torch.arange(6.0).reshape(2, 3))
    assert pool.seal() == []  # no CUDA copy in flight: nothing to wait for
    snap = {"tensors": {"val/x": a}}
    pool.release(snap)
    b = pool.copy_async(src)
    assert b.data_ptr() == a.data_ptr() and torch.equal(b, src)  # the buffer came back and was reused
    c = pool.copy(torch.ones(2, 3))  # the pageable path shares the pool's buffers by shape and dtype
    assert c.data_ptr() != b.data_ptr()


def test_pool_keeps_pinned_and_pageable_buffers_apart():
    """A pageable buffer handed out for a CUDA copy would make the "non-blocking" copy synchronous."""
    pool = state.BufferPool(pin_memory=True)
    pool.release({"tensors": {"k": torch.ones(3)}})  # a pageable buffer, in a pool that pins
    assert list(pool._free) == [(torch.float32, (3,), False)]
    buf = pool._free[(torch.float32, (3,), False)][0]
    assert pool.copy(torch.zeros(3)) is buf  # a CPU tensor's copy takes the pageable one
    if not torch.cuda.is_available():  # asked for a pinned one, the pool must not hand the pageable one out
        pool.release({"tensors": {"k": torch.ones(3)}})
        with pytest.raises(RuntimeError, match="pin"):
            pool.copy_async(torch.zeros(3))


def test_the_writer_waits_for_copies_before_reading():
    waited = []
    event = types.SimpleNamespace(synchronize=lambda: waited.append(True))
    ns = {"__name__": "__main__", "w": torch.ones(2)}
    _, snap = _snap_with(ns, ["w"])
    snap["events"] = [event]
    checkpoint.split(snap)
    assert waited == [True]


# -- the verdict -------------------------------------------------------------------------------------
def _recorded(values):
    return [{"name": "loss", "epoch": 0, "step": i, "seq": 0, "value": v} for i, v in enumerate(values)]


def _rows(values):
    return [("loss", 0, i, 0, v) for i, v in enumerate(values)]


def _result(devinfo, differ=("obj/model",)):
    return {"divergence": [{"epoch": 0, "where": "end", "differ": list(differ), "missing": []}],
            "checks": [{"epoch": 0, "where": "end", "streams": ["obj/model", "rng/torch"]}], "problems": [],
            "modes": {0: "full"}, "devices": devinfo}


GPU_TO_CPU = {"device_map": "cpu", "recorded": ["cuda:0"], "flags": {"deterministic_algorithms": True,
              "cudnn_deterministic": True}, "lost_rng": [], "flag_problems": [], "mapped": [], "misplaced": []}


def test_cross_device_values_within_tolerance_say_so():
    fid = verdict.check(_recorded([1.0, 0.5]), _rows([1.0000001, 0.5]), {0: "full"}, [_result(GPU_TO_CPU)],
                        recorded_code="x", code="x\nflor.log('p', 1)")
    text = verdict.verdict_text(fid)
    assert fid["faithful"] and fid["level"] == verdict.CAVEATS and fid["metrics"]["loss"]["verdict"] == "close"
    assert "within tolerance" in text and "cuda:0 -> cpu" in text and "max abs diff 1e-07" in text
    assert "probe" not in text and "obj/model" in text  # state digests differ as expected: said, not blamed


def test_cross_device_beyond_tolerance_blames_the_device_not_a_probe():
    fid = verdict.check(_recorded([1.0, 0.5]), _rows([1.0, 0.9]), {0: "full"}, [_result(GPU_TO_CPU)],
                        recorded_code="x", code="x\nflor.log('p', 1)")
    text = verdict.verdict_text(fid)
    assert not fid["faithful"] and "beyond the tolerance" in text and "cuda:0 -> cpu" in text
    assert "a probe changed training" not in text and "0.4" in text


def test_nondeterministic_gpu_recording_compares_by_tolerance_on_the_same_device():
    info = {**GPU_TO_CPU, "device_map": None, "flags": {"deterministic_algorithms": False}}
    fid = verdict.check(_recorded([1.0]), _rows([1.0000001]), {0: "full"}, [_result(info)])
    assert fid["faithful"] and "use_deterministic_algorithms" in verdict.verdict_text(fid)
    same = verdict.check(_recorded([1.0]), _rows([1.0]), {0: "full"}, [_result(info, differ=())])
    text = verdict.verdict_text(same)  # bit for bit this time (nanoGPT on an H100): said, and why not guaranteed
    assert same["level"] == verdict.CAVEATS and "bit for bit this time" in text and "not bit-exactly" not in text
    assert "not guaranteed" in text and "use_deterministic_algorithms" in text, text


def test_deterministic_gpu_recording_on_its_device_is_judged_exactly():
    info = {**GPU_TO_CPU, "device_map": None}
    assert verdict.tolerance_mode([_result(info)]) is None
    fid = verdict.check(_recorded([1.0]), _rows([1.0000001]), {0: "full"}, [_result(info, differ=())])
    assert not fid["faithful"] and fid["metrics"]["loss"]["verdict"] == "diverged"
    cpu_run = {**GPU_TO_CPU, "recorded": []}  # a CPU run replayed with device="cpu": still exact
    assert verdict.tolerance_mode([_result(cpu_run)]) is None


def test_another_gpu_model_is_a_reason():
    info = {**GPU_TO_CPU, "device_map": None, "recorded_gpus": ["NVIDIA A100", "NVIDIA H100"],
            "gpus_here": ["NVIDIA H100"]}
    assert verdict.tolerance_mode([_result(info)]) is not None  # cuda:0 was an A100, here an H100
    assert "GPU model" in " ".join(verdict.tolerance_mode([_result(info)])["reasons"])
    mapped = {**info, "recorded": ["cuda:1"], "device_map": {"cuda:1": "cuda:0"}}
    assert verdict.tolerance_mode([_result(mapped)]) is None  # H100 -> H100


def test_lost_generators_are_a_reason():
    info = {**GPU_TO_CPU, "lost_rng": ["cuda:0"]}
    assert any("generator" in r for r in verdict.tolerance_mode([_result(info)])["reasons"])


# -- end to end on the CPU -------------------------------------------------------------------------------
def test_replay_with_device_cpu_of_a_cpu_run_is_still_exact(store):
    ns = setup_namespace(3)
    run = flor.record(TRAIN, name="small", namespace=ns, cells=[f"EPOCHS = 3\n{SETUP}"], store=store,
                      overhead=float("inf"))
    assert run.env["gpu"]["flags"]["deterministic_algorithms"] is False
    code = TRAIN.replace("    sched.step()\n", "    flor.log('lr', opt.param_groups[0]['lr'])\n    sched.step()\n")
    df = flor.replay("small", code=code, epochs="1-2", store=store, device="cpu")
    fid = df.attrs["fidelity"]
    assert fid["level"] == verdict.FAITHFUL and fid["tolerance"] is None, df.attrs["verdict"]
    assert list(df["lr"].dropna()) == [0.1, 0.05]
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA"):
            flor.replay("small", code=code, epochs="1", store=store, device="cuda")


@pytest.mark.parametrize("drawn", [False, True], ids=["cuda_started_unused", "cuda_drawn_from"])
def test_cuda_generators_are_blamed_only_if_the_recording_drew_from_them(store, monkeypatch, drawn):
    """A CPU run in a kernel where CUDA had started (an earlier cell, another library) records the CUDA
    generator state; a replay without CUDA cannot put it back. Seen on an H100: that made every such
    replay 'within tolerance'. Only draws the recording made (its state changed) are a reason."""
    ns = setup_namespace(3)
    state0 = torch.zeros(16, dtype=torch.uint8)  # stands in for torch.cuda.get_rng_state_all() of one GPU
    monkeypatch.setattr(devices, "cuda_rng_states",
                        lambda: [state0 + len(ns["history"])] if drawn else [state0.clone()])
    flor.record(TRAIN, name="small", namespace=ns, cells=[f"EPOCHS = 3\n{SETUP}"], store=store,
                overhead=float("inf"))
    monkeypatch.undo()
    code = TRAIN.replace("    sched.step()\n", "    flor.log('lr', opt.param_groups[0]['lr'])\n    sched.step()\n")
    # without a map on a machine with CUDA the stand-in state would be put into the real generator
    for device in ("cpu",) if torch.cuda.is_available() else ("cpu", None):
        df = flor.replay("small", code=code, epochs="1-2", store=store, device=device)
        fid, text = df.attrs["fidelity"], df.attrs["verdict"]
        assert list(df["lr"].dropna()) == [0.1, 0.05]
        if drawn:
            assert fid["tolerance"] and any("drawn on cuda:0" in r for r in fid["tolerance"]["reasons"]), text
        else:
            assert fid["level"] == verdict.FAITHFUL and fid["tolerance"] is None, text
            assert "cuda" not in text.lower(), text


def test_a_probe_that_changes_a_determinism_setting_is_named(store):
    ns = setup_namespace(3)
    flor.record(TRAIN, name="small", namespace=ns, cells=[f"EPOCHS = 3\n{SETUP}"], store=store, overhead=float("inf"))
    code = TRAIN.replace("    sched.step()\n", "    torch.backends.cudnn.benchmark = True\n    sched.step()\n")
    df = flor.replay("small", code=code, epochs="1", store=store)
    assert not df.attrs["fidelity"]["faithful"] and "GPU determinism settings differ" in df.attrs["verdict"]
