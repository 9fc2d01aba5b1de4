"""Checkpoints and blobs outside the store's folder: on an S3-compatible server (moto's, started here on
127.0.0.1, as s3fs's own tests do) and on a shared folder; replayed on a real Dask cluster."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest

import flor_nb as flor

from conftest import SETUP, TRAIN, dask_client, setup_namespace

distributed = pytest.importorskip("distributed")
s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "flor-test"
PROBE = TRAIN.replace("        opt.step()\n", "        flor.log('grad_norm', grad_norm(model))\n        opt.step()\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint on 127.0.0.1 with an empty bucket; the AWS variables point every process here."""
    port = _free_port()
    # In its own process: a server thread in this one draws from Python's global random (request ids) while
    # a recording here runs, which the replay's state check rightly reports as a difference.
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto's S3 server did not start")
            time.sleep(0.1)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            mp.setenv(key, value)
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield fs
    server.terminate()
    server.wait(10)


@pytest.fixture(scope="module")
def client(s3):
    """Started after the AWS variables are set: its workers inherit them."""
    with dask_client() as c:
        yield c



def _record(name, **where):
    ns = setup_namespace(3)
    return flor.record(TRAIN, name=name, namespace=ns, cells=[f"EPOCHS = 3\n{SETUP}"], overhead=float("inf"), **where)


def _flip_a_byte(read, write, key):
    data = bytearray(read(key))
    data[len(data) // 2] ^= 0x01
    write(key, bytes(data))


def test_record_to_s3_and_replay_from_it_on_the_cluster(store, s3, one_thread, request):
    _record("local")
    run = _record("remote", blobs=f"s3://{BUCKET}/runs")
    client = request.getfixturevalue("client")  # started after the recordings: see conftest's test order
    assert run.env["blobs"] == f"s3://{BUCKET}/runs"
    # the checkpoints are in the bucket, the index is here
    assert s3.find(f"{BUCKET}/runs/blobs") and s3.find(f"{BUCKET}/runs/checkpoints/remote@1")
    assert not (store.home / "checkpoints" / "remote@1").exists()
    assert (store.home / "flor.db").exists()
    local = flor.replay("local", code=PROBE, epochs="1-2", executor=client)
    remote = flor.replay("remote", code=PROBE, epochs="1-2", executor=client)
    assert remote.attrs["fidelity"]["level"] == "faithful", remote.attrs["verdict"]
    pd.testing.assert_frame_equal(local, remote, check_exact=True)
    assert remote["grad_norm"].notna().sum() == 12


def test_a_url_as_the_store_means_the_blobs_go_there(store, s3):
    """--store s3://...: the index stays in the default store, with the notebook."""
    again = flor.record(TRAIN, name="viastore", namespace=setup_namespace(1), cells=[f"EPOCHS = 1\n{SETUP}"],
                        store=f"s3://{BUCKET}/other", overhead=float("inf"))
    assert again.env["blobs"] == f"s3://{BUCKET}/other" and s3.find(f"{BUCKET}/other/checkpoints/viastore@1")
    assert flor.get_run("viastore").label == "viastore@1"
    # the local store's disk accounting leaves the bucket's blobs alone, and still frees its own
    freed = flor.gc()
    assert "could not be read" not in (freed.note or "")
    assert flor.du().attrs["total"] > 0


def test_a_damaged_blob_in_s3_is_detected(store, s3, client, one_thread):
    _record("damaged", blobs=f"s3://{BUCKET}/damaged")
    for key in s3.find(f"{BUCKET}/damaged/blobs"):
        _flip_a_byte(s3.cat_file, s3.pipe_file, key)
    with pytest.raises(flor.FlorError, match=rf"Blob s3://{BUCKET}/damaged/blobs/\S+ is damaged \(hash "
                                                     r"mismatch\)\. Replay other epochs\."):
        flor.replay("damaged", code=PROBE, epochs="2", executor=client)


def test_a_damaged_checkpoint_file_in_s3_is_detected(store, s3, client, one_thread):
    _record("damaged2", blobs=f"s3://{BUCKET}/damaged2")
    for key in s3.find(f"{BUCKET}/damaged2/checkpoints"):
        _flip_a_byte(s3.cat_file, s3.pipe_file, key)
    with pytest.raises(flor.FlorError, match=r"Checkpoint s3://\S+ is damaged"):
        flor.replay("damaged2", code=PROBE, epochs="2", executor=client)


def test_a_shared_folder_for_the_blobs(store, client, one_thread, tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    monkeypatch.setenv("FLOR_NB_BLOBS", str(shared))  # the environment variable sets the default
    run = _record("shared")
    assert run.env["blobs"] == str(shared) and list((shared / "blobs").rglob("*"))
    df = flor.replay("shared", code=PROBE, epochs="2", executor=client)
    assert df.attrs["fidelity"]["level"] == "faithful", df.attrs["verdict"]
    for path in (shared / "blobs").rglob("*"):
        if path.is_file():
            _flip_a_byte(lambda p: p.read_bytes(), lambda p, b: p.write_bytes(b), path)
    with pytest.raises(flor.FlorError, match=rf"Blob {shared}/blobs/\S+ is damaged"):
        flor.replay("shared", code=PROBE, epochs="2", executor=client)


def test_a_location_that_cannot_be_written_fails_before_training(store, s3, tmp_path):
    """A missing bucket (or credentials, or a read-only folder) is named before training: a checkpoint write
    that fails mid-run only warns, and the run would train on without checkpoints, unreplayable."""
    with pytest.raises(flor.FlorError, match=r"s3://no-such-bucket-flor/x.*Nothing was recorded"):
        _record("nobucket", blobs="s3://no-such-bucket-flor/x")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not os.access(locked, os.W_OK):  # root writes anywhere
        with pytest.raises(flor.FlorError, match=r"Cannot write checkpoints to .*locked/blobs"):
            _record("locked", blobs=str(locked / "blobs"))
    assert flor.runs().empty  # nothing was recorded, not even a failed run
    _record("fine", blobs=f"s3://{BUCKET}/fine")
    assert not [k for k in s3.find(f"{BUCKET}/fine") if ".flor-nb-write-check" in k]
