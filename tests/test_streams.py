"""State streams: what a probe adds is new, not a change; objects captured by reference are not merged into."""
from __future__ import annotations

import flor_nb as flor
from conftest import SETUP, TRAIN, setup_namespace


def test_restore_never_walks_into_objects_captured_by_reference():
    """A value that holds a trainer (or a dataset) holds it by reference: restoring puts the live object back
    as it is, without merging into its attributes (an accelerate GradientState holds weak references)."""
    import weakref

    import torch

    from flor_nb import state

    class Data(torch.utils.data.Dataset):  # data: captured by reference, rebuilt by the cells
        def __init__(self):
            self.keep = torch.zeros(1)
            self.ref = weakref.ref(self.keep)
        def __len__(self):
            return 1
        def __getitem__(self, i):
            return self.keep

    ns = {"__name__": "__main__", "data": Data()}
    ns["holder"] = {"data": ns["data"], "n": 1}
    cap = state.Capturer(ns, state.Scope(assigned=set(), free={"holder"}))
    snap = cap.snapshot()
    ns["holder"]["n"] = 2
    assert cap.restore(snap) == [] and ns["holder"] == {"data": ns["data"], "n": 1}



def test_a_probe_that_binds_a_tensor_is_not_a_change(store, tmp_path):
    """``gn = w.grad.norm()`` in a probe binds a new tensor: a new stream, not a difference in the recorded ones."""
    ns = setup_namespace(3)
    flor.record(TRAIN, name="small", namespace=ns, cells=[f"EPOCHS = 3\n{SETUP}"], store=store, overhead=float("inf"))
    code = TRAIN.replace("        opt.step()\n",
                         "        gn = model[0].weight.grad.norm()\n        flor.log('gn', gn.item())\n        opt.step()\n")
    df = flor.replay("small", code=code, epochs="1", store=store)
    assert df.attrs["verdict"].startswith("Faithful replay"), df.attrs["verdict"]
    assert df["gn"].notna().sum() == 6
