"""Only run what you trust: a store not signed with your key is refused; files stay private and inside the store."""
from __future__ import annotations

import os
import shutil
import stat

import numpy as np
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import flor_nb as flor
from conftest import SETUP, TRAIN
from flor_nb import errors
from flor_nb import signing

# The attacker's notebook: a dependency cell that acts when re-run, and a value that acts when unpickled.
PAYLOAD = '''
class Payload:
    def __reduce__(self):
        return (open, (MARKER_PICKLE, "w"))
payload = Payload()
open(MARKER_CELL, "w").close()
'''
TRAIN_WITH_PAYLOAD = TRAIN.replace("    model.train()\n", "    model.train()\n    keep = payload\n")


def as_user(monkeypatch, tmp_path, who):
    """Each user has their own signing key ($XDG_CONFIG_HOME/flor_nb/key)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / f"config-{who}"))


def record(store, name, code=TRAIN, extra=""):
    cells = [f"EPOCHS = 4\n{SETUP}{extra}"]
    ns = {"flor": flor}
    exec(cells[0], ns)
    return flor.record(code, name=name, namespace=ns, cells=cells, store=store, overhead=float("inf"))


@pytest.fixture
def markers(tmp_path):
    cell, pickled = tmp_path / "ran-cell", tmp_path / "ran-unpickled"
    head = f"MARKER_CELL = {str(cell)!r}\nMARKER_PICKLE = {str(pickled)!r}\n"
    yield head, cell, pickled
    assert not cell.exists() and not pickled.exists(), "the payload ran"


def test_a_received_store_is_refused_and_its_payload_never_runs(store, tmp_path, monkeypatch, markers):
    head, cell, _ = markers
    as_user(monkeypatch, tmp_path, "attacker")
    record(store, "gift", TRAIN_WITH_PAYLOAD, head + PAYLOAD)  # the attacker's own, validly signed store
    cell.unlink()  # made while the attacker recorded
    as_user(monkeypatch, tmp_path, "victim")
    with pytest.raises(errors.UntrustedStoreError) as info:
        flor.replay("gift", epochs="1-2", store=store)
    text = str(info.value)
    assert "not signed with your key" in text and "can run any program as you" in text
    assert f"flor.trust({str(store.home)!r})" in text and "--trust" in text
    shell = InteractiveShell.instance()
    try:
        shell.run_cell("%load_ext flor_nb")
        result = shell.run_cell("%%flor replay gift --epochs 1-2 --no-progress\n" + TRAIN_WITH_PAYLOAD)
        assert isinstance(result.error_in_exec, UsageError) and "not signed" in str(result.error_in_exec)
        result = shell.run_cell("%flor resume gift")
        assert isinstance(result.error_in_exec, UsageError) and "not signed" in str(result.error_in_exec)
    finally:
        shell.run_cell("%unload_ext flor_nb")
        InteractiveShell.clear_instance()
    assert flor.runs(store)["name"].tolist() == ["gift"]  # reading is fine: it runs nothing


def test_workers_refuse_a_checkpoint_swapped_into_a_trusted_store(store, tmp_path, monkeypatch, markers):
    """Cells signed by you, one checkpoint file from someone else: the worker that reads it refuses it."""
    head, cell, _ = markers
    as_user(monkeypatch, tmp_path, "attacker")
    evil = flor.get_store(tmp_path / "evil")
    record(evil, "mine", TRAIN_WITH_PAYLOAD, head + PAYLOAD)
    cell.unlink()
    as_user(monkeypatch, tmp_path, "victim")
    run = record(store, "mine")
    theirs, ours = evil.checkpoints(1)[1], store.checkpoints(run.id)[1]
    shutil.copytree(evil.home / "blobs", store.home / "blobs", dirs_exist_ok=True)
    shutil.copy(evil.home / theirs["end_path"], store.home / ours["end_path"])
    with pytest.raises(errors.UntrustedStoreError, match=r"checkpoint checkpoints/mine@1/epoch-00001\.end\.ckpt"):
        flor.replay("mine", epochs="2", code=TRAIN.replace("    sched.step()\n", "    flor.log('x', 1)\n"
                                                                                 "    sched.step()\n"), store=store)


def test_trusting_a_store_re_signs_it(store, tmp_path, monkeypatch):
    as_user(monkeypatch, tmp_path, "alice")
    record(store, "shared")
    moved = tmp_path / "copy" / ".flor"
    shutil.copytree(store.home, moved)
    assert flor.replay("shared", epochs=2, store=moved).attrs["fidelity"]["faithful"]  # a moved store still verifies
    as_user(monkeypatch, tmp_path, "bob")
    with pytest.raises(errors.UntrustedStoreError):
        flor.replay("shared", epochs=2, store=moved)
    done = flor.trust(moved)
    assert done["runs"] == 1 and done["checkpoints"] >= 5 and not done["damaged"]
    assert flor.replay("shared", epochs="1-3", store=moved).attrs["fidelity"]["faithful"]
    as_user(monkeypatch, tmp_path, "carol")
    df = flor.replay("shared", epochs=3, store=moved, trust_store=True)  # what %%flor replay --trust does
    assert df.attrs["fidelity"]["faithful"]


def test_names_and_paths_cannot_leave_the_store(recorded, store, tmp_path):
    with pytest.raises(errors.InputError, match="is not allowed"):
        record(store, "../../../escaped")
    assert not list(tmp_path.rglob("escaped*"))
    store.db.execute("UPDATE checkpoints SET end_path='../../outside.ckpt' WHERE run_id=? AND epoch=2",
                     (recorded.id,))
    (tmp_path.parent / "outside.ckpt").write_bytes(b"FLORCKPT")
    flor.trust(store)  # even a store you trust cannot point outside itself
    with pytest.raises(errors.StoreError, match=r"names the file '\.\./\.\./outside\.ckpt', which lies outside the "
                                                r"store"):
        flor.replay("small", epochs=3, store=store)
    store.db.execute("UPDATE runs SET name='../../evil' WHERE id=?", (recorded.id,))
    with pytest.raises(errors.StoreError, match="lies outside the store"):
        store.checkpoint_dir(store.find_run("../../evil@1"))


def test_the_store_and_the_key_are_private(store, tmp_path):
    old = os.umask(0o022)
    try:
        ns = {"flor": flor, "np": np}
        exec(f"EPOCHS = 2\n{SETUP}", ns)
        flor.record(TRAIN.replace("    sched.step()\n", "    flor.log('w', np.ones(3))\n    sched.step()\n"),
                    name="private", namespace=ns, store=tmp_path / "st", overhead=float("inf"))
    finally:
        os.umask(old)
    home = tmp_path / "st"
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    files = [p for p in home.rglob("*") if p.is_file()]
    kinds = {p.suffix or p.name for p in files}
    assert {".db", ".ckpt", ".npy"} <= kinds and any("blobs" in p.parts for p in files)
    loose = {str(p.relative_to(home)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) & 0o077}
    assert not loose, loose
    loose_dirs = [str(p) for p in home.rglob("*") if p.is_dir() and stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert not loose_dirs, loose_dirs
    key = signing.key_path()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(key.parent.stat().st_mode) == 0o700


def test_a_blob_tag_shorter_than_128_bits_is_refused(store):
    from flor_nb import signing

    tag = signing.mac(b"payload", "blob")
    assert signing.verify(b"payload", tag[:16], "blob") and signing.verify(b"payload", tag, "blob")
    assert not signing.verify(b"payload", tag[:15], "blob") and not signing.verify(b"payload", b"", "blob")
    assert not signing.verify(b"payloaD", tag[:16], "blob")
