"""``flor.arg`` values belong to the run that set them, in scripts too: the args set since the previous record."""
from __future__ import annotations

import flor_nb as flor
from conftest import SETUP, TRAIN, setup_namespace


def test_script_runs_take_the_args_set_since_the_previous_record(store):
    cells = [f"EPOCHS = 2\n{SETUP}"]
    ns = setup_namespace(2)  # its SETUP calls flor.arg("lr", 0.1)
    flor.arg("batch", 32)
    first = flor.record(TRAIN.replace("range(EPOCHS)", "range(flor.arg('epochs', EPOCHS))"), name="a",
                        namespace=ns, cells=cells, store=store)
    second = flor.record(TRAIN, name="b", namespace=setup_namespace(2), cells=cells, store=store)
    third = flor.record(TRAIN, name="c", namespace=ns, cells=cells, store=store)
    assert first.args == {"lr": 0.1, "batch": 32, "epochs": 2}
    assert second.args == {"lr": 0.1}  # set again by its own setup; not batch, not the first run's epochs
    assert third.args == {}
