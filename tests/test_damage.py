"""Damaged checkpoints, blobs and database bytes are detected and named; replay routes around them."""
from __future__ import annotations

import pickle
import re
import struct
import warnings

import numpy as np
import pytest
import torch
import xxhash

import flor_nb as flor
from flor_nb import checkpoint, errors


def _flip(path, at):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["header", "data", "truncated"])
def test_damaged_checkpoint_is_named_and_replay_falls_back(recorded, store, where):
    row = store.checkpoints(recorded.id)[3]
    path = store.home / row["end_path"]  # the state epoch 4 starts from
    if where == "header":
        _flip(path, 40)  # inside the JSON header: it still parses, but it is not what was written
    elif where == "data":
        _flip(path, path.stat().st_size // 2)
    else:
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(checkpoint.CorruptCheckpointError, match=rf"{row['end_path'].split('/')[-1]} is damaged"):
        checkpoint.read(store.home, row["end_path"])
    probed = recorded.code.replace("    sched.step()\n", "    flor.log('wn', weight_norm(model))\n    sched.step()\n")
    with pytest.warns(UserWarning, match="is damaged") as caught:
        df = flor.replay("small", code=probed, epochs=4, store=store)
    assert "JSONDecodeError" not in " ".join(str(w.message) for w in caught)  # not blamed on the user's code
    fidelity = df.attrs["fidelity"]
    assert fidelity["faithful"] and list(fidelity["damaged_checkpoints"]) == ["3"], df.attrs["verdict"]
    assert fidelity["timings"][0]["segment"]["restore"] != 3  # not from the damaged one
    assert "Damaged checkpoint of epoch 3 skipped" in df.attrs["verdict"]
    assert df["wn"].notna().sum() == 1


@pytest.mark.parametrize("how", ["flipped", "truncated"])
def test_damaged_tensor_blob_is_named_and_replay_falls_back(recorded, store, how):
    row = store.checkpoints(recorded.id)[2]
    earlier = {h for e in (-1, 0, 1) for rel in filter(None, (store.checkpoints(recorded.id)[e]["path"],
                                                              store.checkpoints(recorded.id)[e]["end_path"]))
               for h in checkpoint.split(checkpoint.read(store.home, rel))[2]}
    _, python, blobs, _ = checkpoint.split(checkpoint.read(store.home, row["end_path"]))
    mine = sorted(set(blobs) - earlier - {v["__pyblob__"] for v in python.values() if isinstance(v, dict)
                                          and "__pyblob__" in v})
    h = max(mine, key=lambda k: len(blobs[k]))  # a tensor only this checkpoint holds (the weights after epoch 2)
    path = store.home / "blobs" / h[:2] / h
    if how == "flipped":
        _flip(path, 5)
    else:
        path.write_bytes(path.read_bytes()[:-7])
    with pytest.warns(UserWarning, match=rf"Blob .*{h} is damaged"):
        df = flor.replay("small", epochs=3, store=store)
    assert df.attrs["fidelity"]["faithful"] and "2" in df.attrs["fidelity"]["damaged_checkpoints"]


@pytest.mark.parametrize("where", ["header", "part"])
@pytest.mark.parametrize("resealed", [False, True])
def test_damaged_compressed_checkpoint_file_is_named(tmp_path, where, resealed):
    checkpoint.write(tmp_path, "a.ckpt", {"tensors": {"w": {"x": torch.randn(4)}}, "python": {"i": 1}})
    path = tmp_path / "a.ckpt"
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[8:16], "little")
    data[16 + n // 2 if where == "header" else 16 + n + 3] ^= 0x10
    if resealed:  # its xxh3 made to match: the damage is still found, before the HMAC is checked
        data[-16:] = xxhash.xxh3_128_digest(bytes(data[:-16]))
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CorruptCheckpointError, match=rf"{re.escape(str(path))} is damaged"):
        checkpoint.read(tmp_path, "a.ckpt")


@pytest.mark.parametrize("kind", ["pickled", "shuffled"])
@pytest.mark.parametrize("how", ["flipped", "longer", "shorter", "huge", "trailing", "not zlib", "width"])
def test_damaged_compressed_blob_is_named(tmp_path, how, kind):
    """A pickled blob (FLZ1) and a float history's piece (FLZ2: bytes shuffled by width)."""
    if kind == "pickled":
        snap = {"tensors": {}, "python": {"py/cfg": pickle.dumps({"note": "constant " * 200})}}
        h = checkpoint.split(snap)[1]["py/cfg"]["__pyblob__"]
    else:
        snap = {"tensors": {"fchunks/lossi": [torch.linspace(0, 1, 1024)]}, "python": {}}
        h = checkpoint.split(snap)[0]["fchunks/lossi"][0]["__blob__"]
    checkpoint.write(tmp_path, "a.ckpt", snap)
    path = checkpoint.blob_path(tmp_path, h)
    data = bytearray(path.read_bytes())
    assert data.startswith(b"FLZ1" if kind == "pickled" else b"FLZ2")
    start = 12 if kind == "pickled" else 13
    n = int.from_bytes(data[4:12], "little")  # the declared length: that of the pickle, or of the tensor
    if how == "flipped":
        data[len(data) // 2] ^= 0x10
    elif how in ("longer", "shorter", "huge"):
        data[4:12] = {"longer": n + 1, "shorter": n - 1, "huge": 2 ** 64 - 1}[how].to_bytes(8, "little")
    elif how == "trailing":
        data += b"\0"
    elif how == "width":  # FLZ2's width byte (FLZ1's first byte of zlib data)
        data[12] = 3 if kind == "shuffled" else 0
    else:
        data[start:] = b"x" * (len(data) - start)
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CorruptCheckpointError, match=rf"Blob {re.escape(str(path))} is damaged"):
        checkpoint.read(tmp_path, "a.ckpt")


def _value_position(db_path, value: float) -> int:
    raw = db_path.read_bytes()
    at = raw.find(struct.pack(">d", value))  # SQLite keeps a REAL as 8 big-endian bytes
    assert at > 0 and raw.find(struct.pack(">d", value), at + 1) < 0
    return at


def _quiesce(store):
    """Everything in the database file itself, and no open connection caching its pages."""
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    flor.store._STORES.clear()


def test_flipped_value_in_the_database_is_reported_never_returned(recorded, store):
    acc = {r["epoch"]: r["value"] for r in store.logs([recorded.id]) if r["name"] == "acc"}
    _quiesce(store)
    db = store.home / "flor.db"
    _flip(db, _value_position(db, acc[2]) + 7)  # the last bit-bearing byte: a value off by a few ulps
    with pytest.warns(errors.DamagedValueWarning, match=r"1 stored value\(s\) in .*flor.db failed their checksum "
                                                        r"and are left out: acc of small@1 epoch 2"):
        df = flor.dataframe("acc", run="small", store=store.home)
    got = {int(r.epoch): r.acc for r in df.dropna(subset=["acc"]).itertuples()}
    assert got == {e: v for e, v in acc.items() if e != 2}  # every other value exactly; the damaged one absent
    with pytest.warns(errors.DamagedValueWarning):
        table = flor.report("small", store=store.home)  # reports read through the same checks
    assert table.exists()


@pytest.mark.parametrize("how", ["header", "truncated"])
def test_damaged_database_names_the_store_and_the_fix(recorded, store, how):
    """Reads that reach a damaged page name the file and the fix; a read whose pages are all intact (a query
    on a database cut short) returns only values that pass their checksums."""
    acc = {r["epoch"]: r["value"] for r in store.logs([recorded.id]) if r["name"] == "acc"}
    _quiesce(store)
    db = store.home / "flor.db"
    data = bytearray(db.read_bytes())
    if how == "header":
        data[:16] = b"not a database!!"
    else:
        del data[len(data) // 2 // 4096 * 4096:]  # the last pages are gone: a copy cut short
    db.write_bytes(bytes(data))
    cause = "file is not a database" if how == "header" else "database disk image is malformed"
    reads = {"runs": lambda: flor.runs(store.home), "dataframe": lambda: flor.dataframe("acc", run="small",
                                                                                         store=store.home),
             "replay": lambda: flor.replay("small", epochs=2, store=store.home)}
    for what, read in reads.items():
        try:
            got = read()
        except errors.StoreError as e:
            assert re.search(rf"flor.db is damaged \(DatabaseError: {cause}\).*restore it from a backup", str(e)), \
                (what, str(e))
        else:
            assert what == "dataframe", f"{what} read the damaged database without an error"
            values = {int(r.epoch): r.acc for r in got.dropna(subset=["acc"]).itertuples()}
            assert values == {e: acc[e] for e in values}, values  # never a wrong value
        flor.store._STORES.clear()


def test_array_values_are_checked_and_compared_by_content(store):
    code = ("for epoch in range(3):\n    w = np.arange(4.0) * (epoch + 1)\n    for i in range(2):\n"
            "        flor.log('i', i)\n    flor.log('w', w)\n")
    ns = {"flor": flor, "np": np}
    flor.record(code, name="arr", namespace=ns, cells=["import numpy as np"], store=store, overhead=float("inf"))
    df = flor.replay("arr", epochs="1-2", store=store)
    assert df.attrs["fidelity"]["faithful"] and df.attrs["fidelity"]["metrics"]["w"]["verdict"] == "exact"
    assert np.array_equal(df.dropna(subset=["w"])["w"].iloc[0], np.arange(4.0) * 2)  # the frame holds the array
    wide = flor.dataframe("w", run="arr", store=store).dropna(subset=["w"])
    assert np.array_equal(wide["w"].iloc[1], np.arange(4.0) * 2)
    ref = [r for r in store.logs(None) if r["name"] == "w" and r["epoch"] == 1][0]
    path = store.home / flor.runtime.from_json(ref["value"])["__array__"]
    _flip(path, path.stat().st_size - 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wide = flor.dataframe("w", run="arr", store=store)
    assert any("is damaged (its content hash does not match)" in str(w.message) for w in caught)
    assert wide.dropna(subset=["w"])["epoch"].tolist() == [0, 2]  # the damaged array is not returned


def test_a_damaged_blob_every_checkpoint_shares_is_named_once(store):
    """A value that never changes is one blob for all checkpoints: no intact state is left, and replay says so."""
    code = ("for epoch in range(4):\n    for i in range(3):\n        w = cfg['scale'] * (epoch + i)\n"
            "        flor.log('w', w)\n")
    setup = "cfg = {'scale': 2.0, 'note': 'constant ' * 40}"  # over checkpoint._INLINE: a blob, not in the file
    ns = {"flor": flor}
    exec(setup, ns)
    run = flor.record(code, name="shared", namespace=ns, cells=[setup],
                      store=store, overhead=float("inf"))
    _, python, _, _ = checkpoint.split(checkpoint.read(store.home, store.checkpoints(run.id)[2]["end_path"]))
    h = python["py/cfg"]["__pyblob__"]
    _flip(store.home / "blobs" / h[:2] / h, 3)
    with pytest.warns(UserWarning, match="is damaged"), \
            pytest.raises(errors.NoCheckpointError, match=rf"are damaged \(Blob .*{h} is damaged"):
        flor.replay("shared", epochs=3, code=code.replace("        flor.log('w', w)\n",
                                                          "        flor.log('w', w)\n        flor.log('p', 1)\n"),
                    store=store)
