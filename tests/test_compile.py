"""torch.compile: a compiled model records and replays like the model it wraps.

``torch.compile(model)`` returns an ``OptimizedModule`` whose own attributes are dynamo's (the compiled
forward, a context holding the graphs it compiled). Walking them reached FX graphs too deep to pickle,
and every variable that shared their pickle unit (the model, the optimizer, the batches) was lost: found
on nanoGPT's train.py with ``compile = True``, its default. The model here has nanoGPT's shape (weight
tying, causal SDPA attention, ``raw_model``/``unoptimized_model`` aliases); the ``eager`` backend builds
the same wrapper in a second, without a C++ compiler.
"""
from __future__ import annotations

import pickle

import flor_nb as flor
from flor_nb import pickling, verdict

SETUP = '''
import torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)

class Block(nn.Module):  # a pre-norm transformer block with causal attention through SDPA
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2, self.heads = nn.LayerNorm(d), nn.LayerNorm(d), heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(0.1))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1 if self.training else 0.0, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))

class TinyGPT(nn.Module):
    def __init__(self, vocab=32, block=16, d=16, layers=2, heads=2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as GPT-2 does

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

X = torch.randint(0, 32, (8, 16)); Y = torch.randint(0, 32, (8, 16))
model = TinyGPT()
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
