"""Bounded storage: all-zero tensors stored as a marker, and a store budget that thins older checkpoints
without ever making a replay wrong (see flor_nb/thinning.py)."""
from __future__ import annotations

import math

import pytest
import torch

import flor_nb as flor
from flor_nb import checkpoint, housekeeping, thinning
from flor_nb.replay import prepare
from flor_nb.plan import estimate

from conftest import SETUP, TRAIN

# A parameter that never gets a gradient: SGD's momentum buffer for it stays exactly zero, as Adam's state
# does for rows of an embedding no batch reads.
DEAD = SETUP.replace(
    "opt = torch.optim.SGD(model.parameters(),",
    "dead = nn.Parameter(torch.zeros(64, 64))\nopt = torch.optim.SGD(list(model.parameters()) + [dead],")
TRAIN_DEAD = TRAIN.replace("loss = F.cross_entropy(model(xb), yb)",
                           "loss = F.cross_entropy(model(xb), yb) + 0.0 * dead.sum()")
PROBE = TRAIN_DEAD.replace("        opt.zero_grad(); loss.backward()\n",
                           "        opt.zero_grad(); loss.backward()\n        flor.log('gn', grad_norm(model))\n")
EPOCHS = 8


def _record(home, name="thin", max_store=None, epochs=EPOCHS):
    ns = {"flor": flor, "EPOCHS": epochs}
    exec(DEAD, ns)
    return flor.record(TRAIN_DEAD, name=name, namespace=ns, cells=[f"EPOCHS = {epochs}\n{DEAD}"], store=home,
                       overhead=float("inf"), max_store=max_store)


def _size(home, run) -> int:
    return next(u.size for u in housekeeping.usage(home).runs if u.run.id == run.id)


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """Bytes of the run recorded with no budget (a store of its own)."""
    home = tmp_path_factory.mktemp("full") / ".flor"
    run = _record(home, "full", max_store="inf")
    return _size(home, run)


# -- zero tensors -------------------------------------------------------------------------------
def test_zero_tensors_are_a_marker_and_load_bit_exact(tmp_path):
    tensors = {"m": {"zero": torch.zeros(300, 300), "zero_i": torch.zeros(7, dtype=torch.int64),
                     "neg_zero": torch.full((50,), -0.0), "w": torch.randn(40), "scalar": torch.zeros(())}}
    snap = {"tensors": tensors, "python": {}, "roots": ["m"]}
    info = checkpoint.write(tmp_path, "a.ckpt", snap)
    zeros = 300 * 300 * 4 + 7 * 8 + 4
    assert info["zero_bytes"] == zeros
    blobs = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in blobs) == 50 * 4 + 40 * 4  # -0.0 is not zero bytes: stored
    back = checkpoint.read(tmp_path, "a.ckpt")["tensors"]["m"]
    for key, t in tensors["m"].items():
        assert back[key].dtype == t.dtype and back[key].shape == t.shape
        assert back[key].view(-1).view(torch.uint8).tolist() == t.reshape(-1).view(torch.uint8).tolist(), key
    # the digests are those of the state, whatever is stored
    assert {k: v for k, v in info["digests"].items() if k == "m"} == checkpoint.tensor_digests(tensors)
    assert len(checkpoint.references(tmp_path, "a.ckpt")) == 2


def test_chunked_lists_are_referenced(tmp_path):
    """gc must keep the blobs of a long list stored in chunks."""
    snap = {"tensors": {}, "python": {"chunks/history": [b"chunk-0", b"chunk-1"]}}
    checkpoint.write(tmp_path, "a.ckpt", snap)
    assert len(checkpoint.references(tmp_path, "a.ckpt")) == 2


def test_rng_states_are_blobs_stored_once_and_small_values_stay_in_the_file(tmp_path):
    """An RNG state that did not change costs one blob for all checkpoints; a small pickled group is no blob."""
    import pickle
    import random

    import numpy as np

    def snap(i):
        return {"tensors": {}, "python": {"rng/numpy": np.random.get_state(), "rng/random": random.getstate(),
                                          "py/i": pickle.dumps(i), "py/big": pickle.dumps(list(range(200)))}}

    first = checkpoint.write(tmp_path, "a.ckpt", snap(1))
    second = checkpoint.write(tmp_path, "b.ckpt", snap(2))
    assert len(first["new_blobs"]) == 3  # both RNG states and the big group; i stays in the file
    assert second["new_blobs"] == []  # nothing changed but i
    assert second["bytes"] < 3000  # the RNG states alone are about 6.5 kB when pickled into every file
    assert checkpoint.references(tmp_path, "a.ckpt") == checkpoint.references(tmp_path, "b.ckpt")
    back = checkpoint.read(tmp_path, "b.ckpt")["python"]
    assert back["rng/numpy"][0] == "MT19937" and (back["rng/numpy"][1] == np.random.get_state()[1]).all()
    assert back["rng/random"] == random.getstate() and pickle.loads(back["py/i"]) == 2


# -- compressed pickled blobs ----------------------------------------------------------------------
def _history_snapshot():
    """A loss history of 5000 float32 values (5 chunks), a torch generator, a tensor; with the RNG states."""
    lossi = [float(torch.tensor(i / 7).log10()) for i in range(1, 5001)]
    ns = {"__name__": "__main__", "lossi": lossi, "g": torch.Generator().manual_seed(7), "w": torch.randn(64, 64)}
    scope = flor.state.Scope(set(), {"lossi", "g", "w"})
    return ns, scope, flor.state.Capturer(ns, scope).snapshot()


def _stored(home):
    return {p.name: p.read_bytes() for p in (home / "blobs").rglob("*") if p.is_file()}


def test_pickled_blobs_and_generator_states_are_stored_compressed_and_tensors_raw(tmp_path):
    ns, scope, snap = _history_snapshot()
    info = checkpoint.write(tmp_path, "a.ckpt", snap)
    skeleton, python, blobs, _ = checkpoint.split(snap)
    pickled = checkpoint.py_hashes(python)
    assert len(python["chunks/lossi"]["__pyblobs__"]) == 5 and python["rng/random"]["__pyobj__"] in pickled
    stored = _stored(tmp_path)
    for h in python["chunks/lossi"]["__pyblobs__"] + [python["rng/random"]["__pyobj__"]]:
        assert stored[h].startswith(b"FLZ1") and len(stored[h]) < 0.9 * len(blobs[h]), h
    numpy_state = python["rng/numpy"]["__pyobj__"]  # 624 random words: compressing saves nothing, stored raw
    assert stored[numpy_state] == blobs[numpy_state]
    assert stored[skeleton["val/w"]["__blob__"]] == blobs[skeleton["val/w"]["__blob__"]]  # a tensor: raw
    generator = skeleton["obj/g"]["__blob__"]  # a torch generator's state: 624 words in 8 bytes each
    assert stored[generator].startswith(b"FLZ1") and len(stored[generator]) < 0.9 * len(blobs[generator])
    assert info["blobs"] == {h: len(b) for h, b in stored.items()}  # sizes are those stored
    assert info["bytes"] == sum(map(len, stored.values())) + info["file_bytes"]
    back = checkpoint.read(tmp_path, "a.ckpt")
    assert back["python"]["chunks/lossi"] == snap["python"]["chunks/lossi"]
    assert back["python"]["rng/random"] == snap["python"]["rng/random"]
    assert torch.equal(back["tensors"]["val/w"], ns["w"]) and torch.equal(back["tensors"]["obj/g"], ns["g"].get_state())
    fresh = {"__name__": "__main__", "lossi": [], "g": torch.Generator(), "w": torch.zeros(64, 64)}
    flor.state.Capturer(fresh, scope).restore(back)
    assert fresh["lossi"] == ns["lossi"] and torch.equal(fresh["g"].get_state(), ns["g"].get_state())
    checkpoint.verify(tmp_path, "a.ckpt")


def test_a_store_with_uncompressed_pickled_blobs_still_reads(tmp_path):
    """Stores of flor_nb before compression hold pickled blobs raw, under the same names."""
    _, _, snap = _history_snapshot()
    checkpoint.write(tmp_path, "a.ckpt", snap)
    _, python, blobs, _ = checkpoint.split(snap)
    for h in checkpoint.py_hashes(python):
        checkpoint.blob_path(tmp_path, h).write_bytes(blobs[h])
    back = checkpoint.read(tmp_path, "a.ckpt")
    assert back["python"]["chunks/lossi"] == snap["python"]["chunks/lossi"]
    assert back["python"]["rng/random"] == snap["python"]["rng/random"]
    checkpoint.verify(tmp_path, "a.ckpt")


# -- the budget -----------------------------------------------------------------------------------
def test_parse_size():
    assert thinning.parse_size("2GB") == 2e9
    assert thinning.parse_size("1.5 GiB") == 1.5 * 2 ** 30
    assert thinning.parse_size("500mb") == 5e8
    assert math.isinf(thinning.parse_size("inf"))
    with pytest.raises(thinning.StoreBudgetError, match="like 2GB"):
        thinning.parse_size("two gigs")
    assert 0 < thinning.default_budget(".") <= thinning.DEFAULT_CAP


def test_magic_takes_max_store():
    from extension.magics import _RECORD

    assert _RECORD.parse_args(["--max-store", "2GB"]).max_store == "2GB"


@pytest.fixture(scope="module")
def thinned(tmp_path_factory, full_size):
    home = tmp_path_factory.mktemp("thin") / ".flor"
    budget = int(full_size * 0.55)
    run = _record(home, max_store=budget)
    return home, run, budget


def test_thinning_keeps_first_and_last_and_stays_under_budget(thinned, full_size):
    home, run, budget = thinned
    st = flor.get_store(home)
    kept = sorted(st.checkpoints(run.id))
    info = run.state["store_budget"]
    assert info["budget"] == budget and info["thinned"], info
    assert kept[:2] == [-1, 0] and kept[-1] == EPOCHS - 1  # the start, the first epoch's, the latest
    assert sorted(set(kept) | set(info["thinned"])) == list(range(-1, EPOCHS))
    assert set(range(0, EPOCHS, info["every"])) <= set(kept), (kept, info)  # every k-th at least
    assert _size(home, run) <= budget < full_size
    # every thinned epoch still has its state digest, so replays through it are checked there
    digested = {e for (e, kind) in st.digests(run.id) if kind == "end"}
    assert set(info["thinned"]) <= digested
    for row in st.checkpoints(run.id).values():  # what is kept loads (no shared blob was deleted)
        checkpoint.read(home, row["path"])
        if row["end_path"]:
            checkpoint.read(home, row["end_path"])
    assert flor.gc(home).bytes == 0  # thinning left no orphan blob behind


def test_plan_says_what_a_thinned_epoch_costs(thinned):
    home, run, _ = thinned
    st = flor.get_store(home)
    kept = sorted(st.checkpoints(run.id))
    lost = max(run.state["store_budget"]["thinned"])
    k = lost + 1  # its replay would have started from `lost`'s checkpoint
    j = max(e for e in kept if e < k)
    p = prepare(st, run, PROBE, str(k))
    assert p["thinned"][k]["from"] == j and p["thinned"][k]["units"] == k - j and p["thinned"][k]["instead"] == 1
    assert p["epochs_to_run"] == k - j
    assert f"epoch {k} runs {k - j} epochs ({j + 1}-{k}) from the checkpoint after epoch {j} (instead of 1)" in p["summary"]
    assert "thinned to keep the run under its store budget" in estimate(run, p)["text"]
    # an epoch whose checkpoint is there costs one epoch and says nothing about thinning
    p = prepare(st, run, PROBE, str(kept[2] + 1))
    assert not p["thinned"] and "thinned" not in p["summary"]


def test_replay_is_faithful_after_thinning(thinned):
    home, run, _ = thinned
    lost = max(run.state["store_budget"]["thinned"])
    df = flor.replay(run.label, code=PROBE, epochs=str(lost + 1), store=home, workers=1)
    fid = df.attrs["fidelity"]
    assert fid["level"] == "faithful", df.attrs["verdict"]
    assert df["gn"].notna().sum() == 6 and set(df["epoch"]) == {lost + 1}
    assert "thinned" in fid["plan"]


def test_zero_state_is_compact_in_a_recorded_run(thinned):
    home, run, _ = thinned
    st = flor.get_store(home)
    row = st.checkpoints(run.id)[EPOCHS - 1]
    snap = checkpoint.read(home, row["end_path"] or row["path"])
    assert snap["header"]["zeros"]  # the dead parameter and its momentum buffer
    momentum = [v for v in _leaves(snap["tensors"]) if v.shape == (64, 64)]
    assert momentum and all(not v.any() for v in momentum)


def _leaves(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
