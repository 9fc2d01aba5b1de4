"""Shared fixtures: a fresh store per test and a small recorded run."""
from __future__ import annotations

import contextlib
import io
import json
import pickle
import zlib

import pytest
import torch
import xxhash

import flor_nb as flor
from flor_nb import signing
from flor_nb.hashing import hash_bytes

SETUP = '''
import random
import numpy as np
import torch, torch.nn as nn, torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
torch.manual_seed(0); np.random.seed(0); random.seed(0)
X = torch.randn(192, 10); y = (X[:, 0] + X[:, 1] > 0).long()
g = torch.Generator().manual_seed(1)
loader = DataLoader(TensorDataset(X, y), batch_size=32, shuffle=True, generator=g)
model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2))
opt = torch.optim.SGD(model.parameters(), lr=flor.arg("lr", 0.1), momentum=0.9)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
def grad_norm(m):
    return float(sum(p.grad.norm() ** 2 for p in m.parameters()) ** 0.5)
def weight_norm(m):
    return float(sum(p.detach().norm() ** 2 for p in m.parameters()) ** 0.5)
'''

TRAIN = '''
history = []
best = 0.0
for epoch in range(EPOCHS):
    model.train()
    for xb, yb in loader:
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(); loss.backward()
        opt.step()
        flor.log("loss", loss.item())
    sched.step()
    model.eval()
    acc = float((model(X).argmax(1) == y).float().mean()) + 0.0 * np.random.rand() + 0.0 * random.random()
    history.append(acc)
    best = max(best, acc)
    flor.log("acc", acc)
'''


def setup_namespace(epochs=5):
    ns = {"flor": flor, "EPOCHS": epochs}
    exec(SETUP, ns)
    return ns


def record_importing(store, folder, module: str):
    """Record 4 epochs whose setup cell imports ``module`` (``SCALE = 1``, written in ``folder``) as run "mod";
    return the module's file and the training cell with a probe logging ``module.SCALE`` every epoch."""
    path = folder / f"{module}.py"
    path.write_text("SCALE = 1\n")
    cells = [f"import sys\nsys.path.insert(0, {str(folder)!r})\nimport {module}\nEPOCHS = 4\n{SETUP}"]
    ns = {"flor": flor}
    exec(cells[0], ns)
    flor.record(TRAIN, name="mod", namespace=ns, cells=cells, store=store, overhead=float("inf"))
    return path, TRAIN.replace("    sched.step()\n", f"    flor.log('scale', {module}.SCALE)\n    sched.step()\n")


def uncompress_checkpoint(path, rel: str, schema: int) -> None:
    """Rewrite the checkpoint file at ``path`` (``rel`` in its store) as flor_nb wrote schema ``schema`` (2-4):
    header, skeleton and Python part uncompressed; sealed with this user's key from schema 4 on, unsealed
    before (schema 2 does not name its hash either)."""
    data = path.read_bytes()
    n = int.from_bytes(data[8:16], "little")
    header = json.loads(zlib.decompress(data[16:16 + n]))
    n_skel, n_py = header["parts"]
    skel = zlib.decompress(data[16 + n:16 + n + n_skel])
    py = zlib.decompress(data[16 + n + n_skel:16 + n + n_skel + n_py])
    del header["sizes"]
    if header.pop("skeleton", None) == "plain":  # before schema 6 the skeleton was written by torch.save
        buf = io.BytesIO()
        torch.save(pickle.loads(skel), buf)
        skel = buf.getvalue()
    header.update(schema=schema, parts=[len(skel), len(py)],
                  checksums=[hash_bytes(skel, header["hash"]), hash_bytes(py, header["hash"])])
    if schema == 2:
        del header["hash"]
    head = json.dumps(header).encode()
    body = b"FLORCKPT" + len(head).to_bytes(8, "little") + head + skel + py
    if schema >= 4:
        tag = signing.mac(body, f"checkpoint:{rel}")
        body += tag + xxhash.xxh3_128_digest(body + tag)
    path.write_bytes(body)


def record_with_a_lock(store):
    """Record run "locked": 3 epochs that update an object holding a threading.Lock, which cannot be captured
    (the recording warns that guard.lock is not captured)."""
    from flor_nb.errors import NotCapturedWarning

    setup = SETUP + ("import threading\nclass Guard:\n    def __init__(self):\n"
                     "        self.lock, self.n = threading.Lock(), 0\nguard = Guard()\n")
    code = TRAIN.replace("    history.append(acc)\n", "    guard.n += 1\n    history.append(acc)\n")
    ns = {"flor": flor, "EPOCHS": 3}
    exec(setup, ns)
    with pytest.warns(NotCapturedWarning, match="guard.lock"):
        flor.record(code, name="locked", namespace=ns, cells=[f"EPOCHS = 3\n{setup}"], store=store)


@pytest.fixture(autouse=True, scope="session")
def _signing_key_in_a_temp_dir(tmp_path_factory):
    """The per-user signing key lives in $XDG_CONFIG_HOME/flor_nb: the tests' own, never the user's."""
    import os

    saved = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("config"))
    yield
    if saved is None:
        os.environ.pop("XDG_CONFIG_HOME", None)
    else:
        os.environ["XDG_CONFIG_HOME"] = saved


@pytest.fixture(autouse=True)
def _no_args_from_other_tests():
    """flor.arg values set outside a record wait for the next one: one test's must not reach another's."""
    flor.runtime.IDLE.args.clear()


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh store in a temp folder, also the default for the engine's API."""
    home = tmp_path / ".flor"
    monkeypatch.setenv("FLOR_NB_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return flor.get_store(home)


@pytest.fixture
def recorded(store):
    """A 5-epoch run 'small' recorded from a script namespace, with a checkpoint in every epoch."""
    ns = setup_namespace(5)
    run = flor.record(TRAIN, name="small", namespace=ns, cells=[f"EPOCHS = 5\n{SETUP}"], store=store, overhead=float("inf"))
    return run


_CLUSTER_MODULES = ("test_dask.py", "test_object_store.py")


def pytest_collection_modifyitems(config, items):
    """Tests that run an in-process Dask cluster (or an S3 client talking to one) go last: while a cluster
    starts and shuts down its threads in this process can draw from Python's global random module, and a
    recording made here at that moment then (rightly) fails its replay's state check."""
    items.sort(key=lambda item: item.fspath.basename in _CLUSTER_MODULES)  # stable: the order is kept otherwise


@pytest.fixture
def one_thread():
    """Record at 1 torch thread, so 2 workers fit on 2 cores (replay runs at the recorded count)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tolerate_unknown_removals(cluster):
    """distributed's SpecCluster raises KeyError, at close, for a 'remove' of a worker its cached list does not
    hold (dask/distributed#5407): here a worker a test SIGKILLed and its nanny restarted. Seen once in CI as an
    error at the teardown of the Dask tests' cluster; the cluster itself had closed its workers."""
    update = cluster._update_worker_status

    def tolerant(op, msg):
        try:
            update(op, msg)
        except KeyError:
            if op != "remove":
                raise

    cluster._update_worker_status = tolerant


@contextlib.contextmanager
def dask_client():
    """A real 2-process LocalCluster and its Client, with the replay processes started ahead."""
    import distributed

    from flor_nb.dask_executor import close_clients, prestart

    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                                  worker_dashboard_address=None) as cluster, distributed.Client(cluster) as c:
        _tolerate_unknown_removals(cluster)
        prestart(c, ["torch", "numpy"])  # the replay processes start here, not in the first test
        try:
            yield c
        finally:
            close_clients()  # the ones replays opened for dask:// addresses, before their scheduler goes
