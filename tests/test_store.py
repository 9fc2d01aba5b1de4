"""The store keeps every logged value exactly, however it packs them."""
from __future__ import annotations

import math

import numpy as np
import pytest

import flor_nb as flor

CELL = '''
flor.log("before", 1)
for epoch in range(3):
    for step in range(40):
        flor.log("loss", step * 0.1 + epoch)          # many floats per epoch: packed
        flor.log("count", step)                        # many ints: packed, stay ints
        if step % 10 == 0:
            flor.log("loss", -1.0)                     # the same key twice in a step
    flor.log("acc", float("nan") if epoch == 1 else epoch / 10)
    flor.log("note", {"epoch": epoch})
    flor.log("weights", np.arange(4.0) + epoch)        # an array artifact
flor.log("before", 2)                                  # after the loop: same key as before it
'''


def test_values_round_trip(store):
    ns = {"flor": flor, "np": np}
    run = flor.record(CELL, name="store", namespace=ns, store=store)
    rows = store.logs([run.id])
    loss = [(r["epoch"], r["step"], r["seq"], r["value"]) for r in rows if r["name"] == "loss"]
    assert len(loss) == 3 * (40 + 4)
    assert (1, 10, 0, 1 + 10 * 0.1) in loss and (1, 10, 1, -1.0) in loss
    counts = [r["value"] for r in rows if r["name"] == "count"]
    assert counts[:3] == [0, 1, 2] and all(type(c) is int for c in counts)
    before = [(r["seq"], r["value"]) for r in rows if r["name"] == "before"]
    assert before == [(0, 1), (1, 2)]
    wide = flor.dataframe("acc", "note", "weights", run="store", store=store).dropna(subset=["note"])
    assert math.isnan(wide["acc"].iloc[1]) and wide["acc"].iloc[2] == 0.2
    assert wide["note"].tolist() == [{"epoch": 0}, {"epoch": 1}, {"epoch": 2}]
    assert np.array_equal(wide["weights"].iloc[2], np.arange(4.0) + 2)
    steps = [r["step"] for r in rows if r["run_id"] == run.id and r["epoch"] == 0 and r["name"] == "count"]
    assert steps == list(range(40))


def _record(store, name, epochs=3):
    from conftest import SETUP, TRAIN, setup_namespace

    ns = setup_namespace(epochs)
    return flor.record(TRAIN, name=name, namespace=ns, cells=[f"EPOCHS = {epochs}\n{SETUP}"], store=store,
                       overhead=float("inf"))


def _blobs(store):
    return {p.name for p in (store.home / "blobs").glob("*/*")}


def test_delete_keeps_the_blobs_another_run_shares(store):
    from flor_nb import checkpoint, housekeeping

    a, b = _record(store, "a"), _record(store, "b")
    usage = {u.run.label: u for u in housekeeping.usage(store).runs}
    shared = usage["a@1"].blobs & usage["b@1"].blobs
    assert shared, "same seed, same initial weights: the runs share blobs"
    table = flor.runs(store)
    row = table[table["name"] == "a"].iloc[0]
    assert 0 < row["frees_mb"] < row["size_mb"]  # deleting a frees less than its size: b holds the shared part
    freed = flor.delete("a", store=store)
    assert freed.runs == ["a@1"] and freed.bytes > 0 and str(freed).startswith("flor_nb: deleted a@1; freed ")
    assert [r.label for r in store.all_runs()] == ["b@1"]
    left = _blobs(store)
    assert shared <= left and usage["b@1"].blobs <= left
    assert not (usage["a@1"].blobs - usage["b@1"].blobs) & left  # a's own blobs are gone
    for rel in [c["path"] for c in store.checkpoints(b.id).values()]:
        checkpoint.read(store.home, rel)  # every blob b needs is there
    df = flor.replay("b", epochs="1-2", store=store)
    assert df.attrs["fidelity"]["faithful"]
    assert flor.gc(store).bytes == 0  # nothing left to collect
    with pytest.raises(flor.FlorError, match="No run 'a'"):
        flor.delete("a", store=store)


def test_nothing_is_collected_while_a_recording_is_alive(store):
    import os
    import platform

    _record(store, "done", epochs=2)
    orphan = store.home / "blobs" / "ff" / ("ff" * 16)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"x" * 1000)
    from flor_nb.store import RECORDING

    live = store.create_run("live", "for e in range(2): pass", env={"pid": os.getpid(), "host": platform.node()})
    RECORDING.add((str(store.db_path), live.id))  # as a Recorder does while its cell runs
    freed = flor.gc(store)
    assert freed.blobs == 0 and orphan.exists() and "live@1 is being recorded" in str(freed)
    with pytest.raises(flor.FlorError, match="live@1 is being recorded right now"):
        flor.delete("live@1", store=store)
    store.update_run(live.id, status="finished")
    RECORDING.discard((str(store.db_path), live.id))
    freed = flor.gc(store)
    assert freed.blobs == 1 and not orphan.exists() and freed.bytes == 1000
    du = flor.du(store)
    assert list(du["what"][:2]) == ["done@1", "live@1"] and du.attrs["unreferenced"] == 0
    reserve = store.home / ".reserve"  # the full-disk reserve: most of a small store's total, so it is named
    assert reserve.exists(), "a store on a disk with room keeps its reserve"
    row = du[du["what"].str.startswith("reserve kept for a full disk")]
    assert len(row) == 1 and row["bytes"].iloc[0] == reserve.stat().st_size and du["what"].iloc[-1].startswith("total")


def test_a_crashed_recorder_does_not_block_collection(store):
    import platform

    dead = store.create_run("dead", "for e in range(2): pass", env={"pid": 2 ** 22 + 7, "host": platform.node()})
    orphan = store.home / "blobs" / "ee" / ("ee" * 16)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"y")
    assert flor.gc(store).blobs == 1 and store.find_run("dead").status == "interrupted"
    assert dead.id
