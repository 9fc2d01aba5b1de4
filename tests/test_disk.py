"""A real full disk (a small tmpfs): training goes on, log rows keep being stored, reads keep working."""
from __future__ import annotations

import errno
import pathlib
import re
import subprocess
import sys
import warnings

import pytest

import flor_nb as flor
from flor_nb import errors

SETUP = '''
import os
import torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
X = torch.randn(128, 8); y = (X[:, 0] > 0).long()
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
big = torch.zeros(750_000)  # 3 MB that change every epoch: each checkpoint needs 3 MB more
def disk(epoch):
    """Fill or free the disk at chosen epochs (a no-op in replay: FILL is only set where the test records)."""
    plan = globals().get("FILL")
    if not plan:
        return
    path = plan["path"]
    if epoch in plan["fill"]:
        with open(path, "ab", buffering=0) as f:
            for size in (1 << 18, 1 << 12, 1 << 9):
                try:
                    while True:
                        f.write(b"x" * size)

                except OSError:
                    pass
    if epoch in plan["free"] and os.path.exists(path):
        os.remove(path)
'''
TRAIN = '''
for epoch in range(10):
    disk(epoch)
    for i in range(0, 128, 32):
        loss = F.cross_entropy(model(X[i:i + 32]), y[i:i + 32])
        opt.zero_grad(); loss.backward(); opt.step()
        flor.log("loss", loss.item())
    big += 1.0
    flor.log("acc", float((model(X).argmax(1) == y).float().mean()))
'''


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs: a real file system that fills up (ENOSPC)."""
    yield from _tmpfs(tmp_path, "16m")


@pytest.fixture
def tight_disk(tmp_path):
    """A 13 MB tmpfs: four 3 MB checkpoints fit, then the reserve is all the rows have."""
    yield from _tmpfs(tmp_path, "13m")


def _tmpfs(tmp_path, size):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"a real full disk needs a small tmpfs, and mounting one was refused here: {done.stderr.strip()}")
    yield mount
    for st in list(flor.store._STORES.values()):
        st.close()
    flor.store._STORES.clear()
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def record(home, name, fill=(), free=(), filler=None):
    ns = {"flor": flor}
    exec(SETUP, ns)
    if fill:
        ns["FILL"] = {"path": str(filler), "fill": set(fill), "free": set(free)}
    return flor.record(TRAIN, name=name, namespace=ns, cells=[SETUP], store=home, overhead=float("inf"),
                       max_store="inf")  # no store budget: this is about the disk itself filling


def fill_up(path):
    with open(path, "ab", buffering=0) as f:
        for size in (1 << 18, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    f.write(b"x" * size)

            except OSError as e:
                assert e.errno == errno.ENOSPC


@pytest.mark.timeout(240)
def test_checkpoints_stop_rows_go_on_and_reads_work_on_a_full_disk(small_disk):
    home = small_disk / ".flor"
    with pytest.warns(UserWarning, match=r"checkpoints stopped after epoch \d: the disk holding .* is full "
                                         r"\([\d.]+ (KB|MB|bytes)\s?\w* free\)") as caught:
        run = record(home, "full")
    assert not any("held in memory" in str(w.message) for w in caught)  # the reserve kept room for the rows
    assert run.status == "finished" and run.epochs_completed == 10
    ckpts = sorted(flor.get_store(home).checkpoints(run.id))
    assert 0 < len(ckpts) < 11  # some fitted, then they stopped
    acc = flor.dataframe("acc", run="full", store=home).dropna(subset=["acc"])
    assert sorted(acc["epoch"]) == list(range(10))  # every trained epoch's logs are stored
    assert not list(home.rglob("*.tmp"))  # the checkpoint that did not fit left no temp file
    fill_up(small_disk / "filler")  # now not one more byte fits: reading must still work
    assert flor.runs(home)["epochs"].tolist() == [10]
    assert len(flor.dataframe("loss", run="full", store=home)) == 40
    flor.get_store(home).close()  # a new process finds no WAL index, and no room to make one
    fill_up(small_disk / "filler")
    out = subprocess.run([sys.executable, "-c", "import flor_nb as flor, sys; print(flor.runs(sys.argv[1])"
                          "[['name', 'status', 'epochs']].to_string())", str(home)], capture_output=True, text=True)
    assert out.returncode == 0 and "full  finished      10" in out.stdout, out.stderr[-2000:]
    (small_disk / "filler").unlink()
    df = flor.replay("full", epochs=9, store=home)  # from the last checkpoint that fitted
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]


@pytest.mark.timeout(240)
def test_a_checkpoint_queued_as_the_disk_filled_leaves_the_rows_their_room(tight_disk):
    """The writer learns that a checkpoint did not fit only after the next one is queued. Written anyway, that
    one ate the space the released reserve had freed for log rows: the last epochs' logs were lost and the run's
    status could not be stored (bench/faults.py's disk trial, 13 MB). It must not be written, and a checkpoint
    that failed half-way must leave no file behind."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
    import faults

    home = tight_disk / ".flor"
    child = faults.start_child(home, tight_disk.parent / "marks", name="tight", epochs=10, state_mb=3.0,
                               step_sleep=0.0, max_store="inf")
    err = child.communicate(timeout=200)[1].decode()
    assert child.returncode == 0, err[-3000:]
    assert "checkpoints stopped after epoch" in err and "held in memory" not in err, err[-3000:]
    run = flor.get_run("tight", store=home)
    assert run.status == "finished" and run.epochs_completed == 10
    assert sorted(flor.dataframe("acc", run="tight", store=home).dropna(subset=["acc"])["epoch"]) == list(range(10))
    indexed = {rel for row in flor.get_store(home).checkpoints(run.id).values()
               for rel in (row["path"], row["end_path"]) if rel}
    assert {str(p.relative_to(home)) for p in (home / "checkpoints").rglob("*.ckpt")} == indexed


@pytest.mark.timeout(240)
def test_rows_are_held_while_the_disk_is_full_and_written_when_space_returns(small_disk):
    home = small_disk / ".flor"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = record(home, "held", fill=(3, 4, 5), free=(6,), filler=small_disk / "filler")
    said = [str(w.message) for w in caught]
    assert any("rows are held in memory and written as soon as space returns" in m for m in said), said
    assert run.status == "finished" and run.epochs_completed == 10
    acc = flor.dataframe("acc", run="held", store=home).dropna(subset=["acc"])
    assert sorted(acc["epoch"]) == list(range(10))
    assert flor.replay("held", epochs=9, store=home).attrs["fidelity"]["faithful"]


@pytest.mark.timeout(240)
def test_rows_that_never_fit_end_the_run_saying_what_is_replayable(small_disk):
    home = small_disk / ".flor"
    filler = small_disk / "filler"
    with pytest.warns(UserWarning), pytest.raises(errors.DiskFullError) as info:
        record(home, "lost", fill=range(3, 10), filler=filler)
    message = str(info.value)
    stored = re.search(r"is full \(.+ free\): the log rows could not be written\. Epochs 0-(\d) are stored and "
                       r"replayable; the logs of (\d) trained epoch\(s\) after them are lost\. Free space", message)
    assert stored and int(stored[1]) + 1 + int(stored[2]) == 10, message
    filler.unlink()
    run = flor.get_run("lost", store=home)
    assert run.status in ("failed", "interrupted") and run.epochs_completed == int(stored[1]) + 1  # not 'running'
    assert flor.replay("lost", epochs=f"0-{stored[1]}", store=home).attrs["fidelity"]["faithful"]


def _record_plain(home, name):
    ns = {"flor": flor}
    exec(SETUP, ns)
    return flor.record(TRAIN, name=name, namespace=ns, cells=[SETUP], store=home, overhead=float("inf"),
                       max_store="inf")


@pytest.mark.timeout(240)
def test_a_writer_error_that_is_not_a_full_disk_is_reported_as_what_it_is(tmp_path, monkeypatch):
    """An I/O error is not a full disk: the warnings and the final error name it, and never blame free space.

    The faults are raised where the real ones come from: the checkpoint file write (EIO) and SQLite inside the
    row transaction ('disk I/O error'), so the store's own error translation and the recorder's reporting run."""
    import sqlite3

    from flor_nb import checkpoint
    from flor_nb.store import Store

    home = tmp_path / ".flor"
    real_write = checkpoint.write

    def write(root, rel, *args, **kwargs):
        if "epoch-00002" in rel:
            raise OSError(errno.EIO, "Input/output error", rel)
        return real_write(root, rel, *args, **kwargs)

    monkeypatch.setenv("FLOR_NB_SAVER", "thread")  # the fault is patched into this process
    monkeypatch.setattr(checkpoint, "write", write)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = _record_plain(home, "eio")
    said = " ".join(str(w.message) for w in caught)
    assert "checkpoints stopped after epoch 1: writing a checkpoint failed with OSError: [Errno 5] Input/output " \
           "error" in said, said
    assert "full" not in said and "free" not in said, said
    assert run.status == "finished" and run.epochs_completed == 10  # training and its rows went on
    acc = flor.dataframe("acc", run="eio", store=home).dropna(subset=["acc"])
    assert sorted(acc["epoch"]) == list(range(10))
    monkeypatch.setattr(checkpoint, "write", real_write)

    real_insert, broken = Store._insert_groups, {"on": False}
    real_commit = Store.commit_epoch

    def commit_epoch(self, run_id, groups, digests=(), completed=None, **kwargs):
        broken["on"] = broken["on"] or (completed is not None and completed >= 4)  # epochs 0-2 get stored
        return real_commit(self, run_id, groups, digests, completed, **kwargs)

    def insert_groups(self, db, run_id, groups, kind, *args, **kwargs):
        if kind == "recorded" and broken["on"]:
            raise sqlite3.OperationalError("disk I/O error")
        return real_insert(self, db, run_id, groups, kind, *args, **kwargs)

    monkeypatch.setattr(Store, "commit_epoch", commit_epoch)
    monkeypatch.setattr(Store, "_insert_groups", insert_groups)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(errors.StoreError) as info:
        warnings.simplefilter("always")
        _record_plain(home, "io")
    message, said = str(info.value), " ".join(str(w.message) for w in caught)
    assert not isinstance(info.value, errors.DiskFullError), message
    assert "storing log rows failed" in said and "disk I/O error" in said, said
    assert re.search(r"storing log rows failed \(StoreError: .*OperationalError: disk I/O error.*\)\. Epochs 0-2 are "
                     r"stored and replayable; the logs of \d trained epoch\(s\) after them are lost", message), message
    assert "Free space" not in message and "space returns" not in said, (message, said)  # not a full disk
    monkeypatch.undo()
    run = flor.get_run("io", store=home)
    assert run.status == "failed" and run.epochs_completed == 3  # not 'running'
    assert flor.replay("io", epochs="0-2", store=home).attrs["fidelity"]["faithful"]


def test_blobs_written_together_appear_whole_and_a_failure_leaves_nothing(tmp_path):
    """A checkpoint's new blobs are written in one go (one filesystem flush, not one fsync each): each appears
    with its bytes under its name, private to the user; when one cannot be written, none is left behind,
    temp files included."""
    from flor_nb import disk

    items = [(tmp_path / "blobs" / f"{i:02x}" / f"{i:02x}{'ab' * 15}", bytes([i]) * (1000 + i)) for i in range(40)]
    disk.write_all_atomic(items, tmp_path)
    for path, data in items:
        assert path.read_bytes() == data
        assert path.stat().st_mode & 0o077 == 0
    assert not list(tmp_path.rglob("*.tmp"))

    (tmp_path / "blocked").write_bytes(b"a file where a folder must go")
    bad = [(tmp_path / "more" / f"f{i}", b"x" * 10) for i in range(5)]
    bad.insert(3, (tmp_path / "blocked" / "inside", b"cannot be written"))
    with pytest.raises(OSError):
        disk.write_all_atomic(bad, tmp_path)
    assert [p for p in (tmp_path / "more").rglob("*") if p.is_file()] == []  # no blob, no temp file


@pytest.mark.parametrize("release, batched", [("6.18.44-fc-v669", True), ("5.8.0", True), ("5.7.19-generic", False),
                                              ("4.19.0-25-amd64", False), ("weird", False)])
def test_blobs_are_flushed_together_only_where_a_failed_flush_is_reported(release, batched):
    """syncfs reports a failed write only from Linux 5.8: on older kernels each blob keeps its own fsync, so an I/O
    error still stops checkpoints when it happens instead of surfacing as a damaged blob at replay."""
    from flor_nb import disk

    assert disk._reports_errors(release) is batched


def test_files_written_in_pieces_hold_every_byte(tmp_path):
    """write_atomic and write_all_atomic write in 1 MB calls (bench/write_chunks.py): sizes around the piece
    boundary, and a tensor's bytes seen through a float32 memoryview, come back exactly."""
    import os

    import torch

    from flor_nb import disk

    big = os.urandom((5 << 19) + 3)  # 2.5 MB and 3 bytes
    t = torch.arange(300_000, dtype=torch.float32)
    items = {"a": big, "b": big[: 1 << 20], "c": big[: (1 << 20) + 1], "d": b"", "e": memoryview(t.numpy())}
    disk.write_all_atomic([(tmp_path / "all" / k, v) for k, v in items.items()], tmp_path)
    for k, v in items.items():
        disk.write_atomic(tmp_path / "one" / k, v)
        for folder in ("all", "one"):
            assert (tmp_path / folder / k).read_bytes() == bytes(v), (folder, k)
