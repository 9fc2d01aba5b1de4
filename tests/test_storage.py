"""Bounded storage: all-zero tensors stored as a marker, and a store budget that thins older checkpoints
without ever making a replay wrong (see flor_nb/thinning.py)."""
from __future__ import annotations

import json
import math
import pickle
import struct
import zlib

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


# -- compressed blobs, float histories ------------------------------------------------------------
def _history_snapshot(lossi=None):
    """A loss history of 5000 float32 values (5 chunks), a torch generator, a tensor; with the RNG states."""
    lossi = [float(torch.tensor(i / 7).log10()) for i in range(1, 5001)] if lossi is None else lossi
    ns = {"__name__": "__main__", "lossi": lossi, "g": torch.Generator().manual_seed(7), "w": torch.randn(64, 64)}
    scope = flor.state.Scope(set(), {"lossi", "g", "w"})
    cap = flor.state.Capturer(ns, scope)
    return ns, scope, cap.snapshot(), cap


def _stored(home):
    return {p.name: p.read_bytes() for p in (home / "blobs").rglob("*") if p.is_file()}


def _restored(scope, snap_or_home, rel="a.ckpt"):
    back = checkpoint.read(snap_or_home, rel)
    fresh = {"__name__": "__main__", "lossi": [], "g": torch.Generator(), "w": torch.zeros(64, 64)}
    flor.state.Capturer(fresh, scope).restore(back)
    return fresh


def _bits(values):
    return [struct.pack("<d", v) for v in values]


def test_blobs_are_stored_compressed_where_it_pays_and_a_float_history_as_float32(tmp_path):
    ns, scope, snap, _ = _history_snapshot()
    info = checkpoint.write(tmp_path, "a.ckpt", snap)
    skeleton, python, blobs, digests = checkpoint.split(snap)
    pieces = skeleton["fchunks/lossi"]  # float32 values, widened: stored as float32 tensors, never pickled
    assert [p["dtype"] for p in pieces] == ["float32"] * 5 and sum(p["shape"][0] for p in pieces) == 5000
    assert "chunks/lossi" not in python and not any(k.startswith("fchunks/") for k in digests)
    stored = _stored(tmp_path)
    for p in pieces:  # shuffled by 4 bytes, then zlib: 4 bytes a value become about 3.4
        assert stored[p["__blob__"]].startswith(b"FLZ2") and len(stored[p["__blob__"]]) < 0.9 * len(blobs[p["__blob__"]])
    rng = python["rng/random"]["__pyobj__"]  # a pickled blob
    assert stored[rng].startswith(b"FLZ1") and len(stored[rng]) < 0.9 * len(blobs[rng])
    numpy_state = python["rng/numpy"]["__pyobj__"]  # 624 random words: compressing saves nothing, stored raw
    assert stored[numpy_state] == blobs[numpy_state]
    assert stored[skeleton["val/w"]["__blob__"]] == blobs[skeleton["val/w"]["__blob__"]]  # a tensor: raw
    generator = skeleton["obj/g"]["__blob__"]  # a torch generator's state: 624 words in 8 bytes each
    assert stored[generator].startswith(b"FLZ2") and len(stored[generator]) < 0.6 * len(blobs[generator])
    assert info["blobs"] == {h: len(b) for h, b in stored.items()}  # sizes are those stored
    assert info["bytes"] == sum(map(len, stored.values())) + info["file_bytes"]
    back = checkpoint.read(tmp_path, "a.ckpt")
    assert back["python"]["rng/random"] == snap["python"]["rng/random"]
    assert torch.equal(back["tensors"]["val/w"], ns["w"]) and torch.equal(back["tensors"]["obj/g"], ns["g"].get_state())
    fresh = _restored(scope, tmp_path)
    assert _bits(fresh["lossi"]) == _bits(ns["lossi"]) and all(type(v) is float for v in fresh["lossi"])
    assert torch.equal(fresh["g"].get_state(), ns["g"].get_state())
    checkpoint.verify(tmp_path, "a.ckpt")
    assert {p["__blob__"] for p in pieces} <= checkpoint.references(tmp_path, "a.ckpt")  # gc keeps them


def test_a_float_history_comes_back_bit_for_bit_and_other_lists_stay_pickled(tmp_path):
    nan = struct.unpack("<d", struct.pack("<Q", 0x7FF8_0000_DEAD_BEEF))[0]  # a NaN with a payload
    odd = [0.1 * i for i in range(3000)] + [-0.0, float("inf"), nan, 5e-324]  # not float32: kept as float64
    ns, scope, snap, _ = _history_snapshot(odd)
    checkpoint.write(tmp_path, "a.ckpt", snap)
    skeleton, *_ = checkpoint.split(snap)
    assert {p["dtype"] for p in skeleton["fchunks/lossi"]} == {"float64"}
    assert _bits(_restored(scope, tmp_path)["lossi"]) == _bits(odd)
    mixed = [float(i) for i in range(3000)] + [7, True]  # an int and a bool among them: pickled
    ns, scope, snap, _ = _history_snapshot(mixed)
    checkpoint.write(tmp_path, "b.ckpt", snap)
    skeleton, python, *_ = checkpoint.split(snap)
    assert "fchunks/lossi" not in skeleton and len(python["chunks/lossi"]["__pyblobs__"]) == 3
    back = _restored(scope, tmp_path, "b.ckpt")["lossi"]
    assert back == mixed and [type(v) for v in back] == [type(v) for v in mixed]


def test_a_growing_history_writes_its_new_values_only_and_a_change_is_written_again(tmp_path):
    lossi = [float(torch.tensor(i / 7).log10()) for i in range(1, 2201)]
    ns, scope, _, cap = _history_snapshot(lossi)
    written = []

    def checkpoint_now(rel):
        info = checkpoint.write(tmp_path, rel, cap.snapshot())
        written.append(info)
        skeleton, *_ = checkpoint.split(cap.snapshot())
        return [(p["shape"][0], p["__blob__"]) for p in skeleton["fchunks/lossi"]], info

    first, _ = checkpoint_now("1.ckpt")  # 1024 + 1024 + 152: the last piece is short, so written again
    assert [n for n, _ in first] == [1024, 1024, 152]
    lossi.extend(float(torch.tensor(i / 3).log10()) for i in range(1, 2001))
    second, info = checkpoint_now("2.ckpt")  # the full pieces stay; new values from 2048 on
    assert [n for n, _ in second] == [1024, 1024, 1024, 1024, 104] and second[:2] == first[:2]
    assert set(info["new_blobs"]) & {h for _, h in second} == {h for _, h in second[2:]}
    lossi.extend([0.5] * 400)  # the 104 values are now part of a piece of 504: kept from here on
    third, _ = checkpoint_now("3.ckpt")
    assert [n for n, _ in third] == [1024, 1024, 1024, 1024, 504] and third[:4] == second[:4]
    lossi.extend([0.25] * 10)
    fourth, info = checkpoint_now("4.ckpt")
    assert fourth[:5] == third and [n for n, _ in fourth] == [1024] * 4 + [504, 10]
    lossi[1500] = -1.0  # changed in place: that piece and every later one are written again
    fifth, _ = checkpoint_now("5.ckpt")
    assert fifth[0] == first[0] and fifth[1] != first[1] and sum(n for n, _ in fifth) == len(lossi)
    del lossi[3000:]  # shorter
    sixth, _ = checkpoint_now("6.ckpt")
    assert sum(n for n, _ in sixth) == 3000
    for rel, expect in (("5.ckpt", None), ("6.ckpt", lossi)):
        got = _restored(scope, tmp_path, rel)["lossi"]
        if expect is not None:
            assert _bits(got) == _bits(expect)
    assert _restored(scope, tmp_path, "5.ckpt")["lossi"][1500] == -1.0


def test_a_store_with_uncompressed_blobs_still_reads(tmp_path):
    """Stores of flor_nb before compression hold pickled blobs and generator states raw, same names."""
    ns, scope, snap, _ = _history_snapshot([float(i) for i in range(3000)] + [1])  # pickled chunks
    checkpoint.write(tmp_path, "a.ckpt", snap)
    skeleton, python, blobs, _ = checkpoint.split(snap)
    for h in checkpoint.py_hashes(python) | {skeleton["obj/g"]["__blob__"]}:
        checkpoint.blob_path(tmp_path, h).write_bytes(blobs[h])
    back = checkpoint.read(tmp_path, "a.ckpt")
    assert back["python"]["chunks/lossi"] == snap["python"]["chunks/lossi"]
    assert back["python"]["rng/random"] == snap["python"]["rng/random"]
    assert _restored(scope, tmp_path)["lossi"] == ns["lossi"]
    checkpoint.verify(tmp_path, "a.ckpt")


def test_a_skeleton_that_names_a_class_is_refused_before_anything_runs(tmp_path):
    """A schema-6 skeleton is containers and plain values: an unpickler that names any class refuses it,
    even in a file this user's key signed."""
    _, _, snap, _ = _history_snapshot()
    checkpoint.write(tmp_path, "a.ckpt", snap)
    path = tmp_path / "a.ckpt"
    data = path.read_bytes()
    n = int.from_bytes(data[8:16], "little")
    header = json.loads(zlib.decompress(data[16:16 + n]))
    for key in ("parts", "sizes", "checksums"):
        del header[key]
    marker = tmp_path / "ran"
    evil = pickle.dumps({"val/w": _Run(str(marker))})
    path.write_bytes(checkpoint._seal("a.ckpt", header, evil, pickle.dumps({"vmeta": {}})))
    for call in (checkpoint.read, checkpoint.verify, checkpoint.references):
        with pytest.raises(checkpoint.CorruptCheckpointError, match="tensor tree does not load"):
            call(tmp_path, "a.ckpt")
    assert not marker.exists()


class _Run:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


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
