"""A SIGKILL of a recording process at any moment loses at most the epoch in progress (bench/faults.py's trials)."""
from __future__ import annotations

import os
import pathlib
import random
import sys

import pytest

import flor_nb as flor
from flor_nb.store import Store

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
import faults  # noqa: E402  the fault injector: a recording child process with epoch markers


@pytest.mark.timeout(240)
@pytest.mark.parametrize("when", ["after:2", "checkpoint", "epoch_end"])
def test_sigkill_keeps_every_epoch_the_user_saw_finish(tmp_path, when):
    """Killed as the loop moves on, mid-checkpoint (a temp file exists), or right after an epoch's body ended."""
    rng = random.Random(7)
    for attempt in range(8):  # mid-checkpoint: until the kill lands while a temp file is being written
        home, marks = tmp_path / str(attempt) / ".flor", tmp_path / str(attempt) / "marks"
        r = faults.kill_trial(home, marks, when, rng, state_mb=8.0)
        if when != "checkpoint" or r["mid_checkpoint"]:
            break
    assert r["status"] == "interrupted" and not r["integrity_errors"], r
    assert r["completed"] >= r["seen"] >= (3 if when == "after:2" else 1), r  # nothing the user saw finish is lost
    assert r["faithful"] and r["replayable"] == r["completed"], r["verdict"]
    assert r["tmp_after"] == 0, r  # temp files of the killed writer are gone once the store is reopened
    if when == "checkpoint":
        assert r["mid_checkpoint"] and r["tmp_before"] >= 1, r


def test_temp_files_of_dead_processes_are_removed_on_open(store, tmp_path):
    import subprocess

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    orphans = [store.home / "blobs" / "ab" / f".abcdef.{pid}-7.tmp", store.home / "checkpoints" / "x@1" /
               f".epoch-00001.end.ckpt.{pid}-9.tmp"]
    mine = store.home / "blobs" / "cd" / f".cdef.{os.getpid()}-1.tmp"  # a write in progress here: kept
    for p in [*orphans, mine]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    Store(store.home)
    assert not any(p.exists() for p in orphans) and mine.exists()


def test_rows_and_completion_are_one_transaction(recorded, store):
    """Every completed epoch has its rows, its digests and its count stored together (no 'out of range')."""
    digests = store.digests(recorded.id)
    rows = store.logs([recorded.id])
    for epoch in range(recorded.epochs_completed):
        assert (epoch, "end") in digests
        assert any(r["epoch"] == epoch and r["name"] == "acc" for r in rows)
    assert recorded.timings["commit_seconds"] and max(recorded.timings["commit_seconds"]) < 1.0
    assert flor.replay("small", epochs=recorded.epochs_completed - 1, store=store).attrs["fidelity"]["faithful"]
