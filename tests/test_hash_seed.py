"""Python hashes str and bytes with a per-process seed unless PYTHONHASHSEED is set: code that depends on those
hashes (minGPT's demo splits its data by ``hash(...) % 4``) cannot be replayed in another process. The user is told
before training, and a diverged replay names it as a cause; with PYTHONHASHSEED set, the replay is faithful."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SETUP = '''
import torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
X = torch.randn(64, 4); y = (X[:, 0] > 0).long()
net = nn.Linear(4, 2)
opt = torch.optim.SGD(net.parameters(), lr=0.1)
def split(i):  # which half of the data a row is in: by the hash of its name, as minGPT's SortDataset does
    return hash(f"row{i}") % 2
'''
TRAIN = '''
for epoch in range(3):
    rows = [i for i in range(64) if split(i) == epoch % 2]
    loss = F.cross_entropy(net(X[rows]), y[rows])
    opt.zero_grad(); loss.backward(); opt.step()
    flor.log("loss", loss.item())
'''
PROBED = TRAIN.replace('    flor.log("loss", loss.item())\n',
                       '    flor.log("loss", loss.item())\n    flor.log("n", len(rows))\n')
assert PROBED != TRAIN

def _run(script: str, **env) -> subprocess.CompletedProcess:
    """``script`` in a fresh Python with the test's environment and ``env`` (a value None: unset), so each test gets
    the hashing it needs whatever the test runner set (pytest-xdist sets PYTHONHASHSEED in its workers)."""
    full = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    for k, v in env.items():
        full.pop(k, None) if v is None else full.__setitem__(k, v)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=full, capture_output=True, text=True,
                          timeout=300)


def test_code_that_calls_hash_is_told_before_training_and_named_when_its_replay_diverges(tmp_path):
    done = _run(f'''
        import re, warnings, flor_nb as flor
        from flor_nb.errors import NotCapturedWarning
        from test_hash_seed import SETUP, TRAIN, PROBED
        ns = {{"flor": flor}}
        exec(SETUP, ns)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = flor.record(TRAIN, name="hashed", namespace=ns, cells=[SETUP], store={str(tmp_path)!r},
                              overhead=float("inf"), progress=False)
        told = [str(w.message) for w in caught if issubclass(w.category, NotCapturedWarning)]
        assert any(re.search(r"In\\[1\\] line 8 calls hash\\(\\).*PYTHONHASHSEED=0", t, re.S) for t in told), told
        assert run.env["hashseed"] == {{"seed": None, "randomized": True}}, run.env["hashseed"]
        out = flor.replay("hashed", code=PROBED, epochs=[1, 2], store={str(tmp_path)!r})  # another process, seed
        v = out.attrs["verdict"]
        assert not out.attrs["fidelity"]["faithful"], v
        assert "calls hash() (In[1] line 8)" in v and "PYTHONHASHSEED was not set" in v, v
        print("OK")
    ''', PYTHONHASHSEED=None)
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]


def test_with_pythonhashseed_set_the_same_code_replays_faithfully(tmp_path):
    """The advice works: a process started with PYTHONHASHSEED=0 records, and its replay (forked from a server
    that inherits the setting) is faithful with the probe's values equal to the recording's."""
    script = f'''
        import warnings, flor_nb as flor
        from test_hash_seed import SETUP, TRAIN, PROBED
        ns = {{"flor": flor}}
        exec(SETUP, ns)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning: the seed is set
            flor.record(TRAIN, name="seeded", namespace=ns, cells=[SETUP], store={str(tmp_path)!r},
                        overhead=float("inf"), progress=False)
        out = flor.replay("seeded", code=PROBED, epochs=[1, 2], store={str(tmp_path)!r})
        assert out.attrs["fidelity"]["faithful"], out.attrs["verdict"]
        rec = flor.dataframe("loss", run="seeded", store={str(tmp_path)!r}).dropna(subset=["loss"])
        assert out.dropna(subset=["loss"])["loss"].tolist() == rec[rec.epoch >= 1]["loss"].tolist()
        print("OK", out["n"].dropna().tolist())
    '''
    done = _run(script, PYTHONHASHSEED="0")
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]


def test_only_sets_whose_order_can_leak_are_named():
    from flor_nb.hash_seed import hash_calls, unordered_sets
    src = [("In[2]", "vocab = list(set(text))\nchars = sorted(list(set(''.join(words))))\n"
                     "assert split in {'train', 'test'}\nseen = {w for w in words}\nh = hash(b'x') % 4\n")]
    assert unordered_sets(src) == ["In[2] line 1", "In[2] line 4"]  # not the sorted one, not a membership test
    assert hash_calls(src) == ["In[2] line 5"]
