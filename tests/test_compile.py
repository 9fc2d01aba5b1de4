"""torch.compile: a compiled model records and replays like the model it wraps.

``torch.compile(model)`` returns an ``OptimizedModule`` whose own attributes are dynamo's (the compiled
forward, a context holding the graphs it compiled). Walking them reached FX graphs too deep to pickle,
and every variable that shared their pickle unit (the model, the optimizer, the batches) was lost. The
``eager`` backend builds the same wrapper in a second, without a C++ compiler.
"""
from __future__ import annotations

import pathlib
import pickle

import pandas as pd

import flor_nb as flor
from flor_nb import pickling, verdict

NANOGPT = pathlib.Path(__file__).resolve().parent / "nanogpt"
SETUP = f'''
import sys
sys.path.insert(0, {str(NANOGPT)!r})
import torch
from model import GPT, GPTConfig
torch.manual_seed(0)
X = torch.randint(0, 32, (8, 16)); Y = torch.randint(0, 32, (8, 16))
model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.1, bias=False))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
unoptimized_model = model
model = torch.compile(model, backend="eager")
raw_model = model
object.__setattr__(model, "seen", 0)  # an attribute of the wrapper itself (older torch kept user attributes there)
'''
TRAIN = '''
for epoch in range(3):
    for i in range(3):
        logits, loss = model(X, Y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        flor.log("loss", loss.item())
        object.__setattr__(model, "seen", model.__dict__["seen"] + 1)
'''
PROBED = TRAIN.replace('        optimizer.step()\n', '        flor.log("gn", float(sum(p.grad.norm() ** 2 for p in '
                       'raw_model.parameters())))\n        flor.log("seen", model.__dict__["seen"])\n'
                       '        optimizer.step()\n')


def _record(store, name, code):
    ns = {"flor": flor, "__name__": "__main__"}
    exec(SETUP, ns)
    return flor.record(code, name=name, namespace=ns, cells=[SETUP], store=store, overhead=float("inf"),
                       progress=False)


def test_a_compiled_model_is_captured_and_replays_like_probes_from_the_start(store):
    run = _record(store, "compiled", TRAIN)
    assert not run.state["not_captured"], run.state["not_captured"]
    truth = _record(store, "truth", PROBED)
    df = flor.replay("compiled", code=PROBED, epochs="1", store=store)
    assert df.attrs["fidelity"]["level"] == verdict.FAITHFUL, df.attrs["verdict"]
    want = flor.dataframe("gn", "seen", run=truth.label, store=store)
    got, want = (f[f["epoch"] == 1].dropna(subset=["gn"]) for f in (df, want))
    assert len(got) == 3 and list(got["gn"]) == list(want["gn"])
    assert list(got["seen"]) == list(want["seen"]) == [3, 4, 5]  # the wrapper's own attribute, restored
    assert "wrote" not in df.attrs["verdict"]  # dynamo's scratch files are not the user's


def test_a_unit_left_out_whole_unpickles_as_the_one_keep():
    """A unit that could not be pickled is stored as KEEP; restore skips it by identity (it crashed with
    "'Keep' object is not subscriptable" when it came back as a new Keep)."""
    assert pickle.loads(pickle.dumps(pickling.KEEP)) is pickling.KEEP
    assert pickling.loads(pickling.dumps(pickling.KEEP, {}, "__main__", {}, set()), None) is pickling.KEEP
