"""The store keeps every logged value exactly, however it packs them."""
from __future__ import annotations

import math

import numpy as np

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
