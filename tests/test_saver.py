"""The checkpoint saver process: it writes what the writer thread would, serves the next recording with the
same buffers, and a saver killed mid-recording loses no checkpoint (the writer thread takes over, and says so
in the run's timings and the log; the next recording starts a new saver)."""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal

import pytest

import flor_nb as flor
from flor_nb import saver
from flor_nb.shared_buffers import available
from flor_nb.store import Store

pytestmark = pytest.mark.skipif(not (available() and "forkserver" in mp.get_all_start_methods()),
                                reason="no saver process on this platform (needs memfd_create and forkserver)")

SETUP = '''
import os, select, signal, multiprocessing
import torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
X = torch.randn(96, 8); y = (X[:, 0] > 0).long()
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
opt = torch.optim.Adam(model.parameters(), lr=0.01)
none = torch.zeros(0, 3)  # no bytes: it reaches the saver by copy, not shared memory
seen = torch.zeros((), dtype=torch.int64)
losses = []
def kill_saver(epoch):
    """Send this recording's saver process SIGNAL (SIGKILL) at KILL_AT (a no-op where KILL_AT is not set)."""
    if globals().get("KILL_AT") == epoch:
        sig = globals().get("SIGNAL", signal.SIGKILL)
        for p in multiprocessing.active_children():
            if p.name == "flor_nb-saver":
                fd = os.pidfd_open(p.pid)
                os.kill(p.pid, sig)
                # Wait for it to end without reading its exit status: the writer thread reads it (a second
                # reader of a forkserver child's status finds the pipe empty, and reads exit code 255).
                waiting = select.poll()  # poll, not select: a long test run has fds numbered past select's 1024
                waiting.register(fd, select.POLLIN)
                waiting.poll(5000 if sig == signal.SIGKILL else 500)
                os.close(fd)
'''
TRAIN = '''
for epoch in range(6):
    kill_saver(epoch)
    for i in range(0, 96, 32):
        loss = F.cross_entropy(model(X[i:i + 32]), y[i:i + 32])
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
        flor.log("loss", loss.item())
    seen += 1
    none = torch.zeros(0, epoch + 1)
'''
PROBE = TRAIN.replace('flor.log("loss", loss.item())',
                      'flor.log("loss", loss.item()); flor.log("w", float(model[0].weight.detach().sum()))')


def _record(home, name, kill_at=None, sig=signal.SIGKILL):
    ns = {"flor": flor}
    exec(SETUP, ns)
    if kill_at is not None:
        ns["KILL_AT"], ns["SIGNAL"] = kill_at, sig
    return flor.record(TRAIN, name=name, namespace=ns, cells=[SETUP], store=home, overhead=float("inf"),
                       progress=False)


def _savers() -> list:
    return [p for p in mp.active_children() if p.name == "flor_nb-saver"]


@pytest.mark.timeout(240)
def test_the_saver_process_writes_the_checkpoints_the_writer_thread_would(tmp_path, monkeypatch):
    home = tmp_path / ".flor"
    by_process = _record(home, "proc")
    # 6 epochs' checkpoints; the start one too unless the saver was still starting (in a kernel it starts in
    # the background, and an in-process IPython shell of an earlier test leaves this process looking like one)
    assert by_process.timings["saver"]["process"] in (6, 7) and by_process.timings["saver"]["why_not"] is None
    (first,) = _savers()  # it stays for the next recording
    made = saver.current().buffers._next
    again = _record(home, "again")
    assert again.timings["saver"] == {**again.timings["saver"], "process": 7, "why_not": None}
    assert _savers() == [first] and saver.current().buffers._next == made  # same process, same buffers
    monkeypatch.setenv("FLOR_NB_SAVER", "thread")
    by_thread = _record(home, "thread")
    assert by_thread.timings["saver"]["process"] == 0
    store = Store(home)
    assert store.digests(by_process.id) == store.digests(by_thread.id)  # the same state, stream by stream
    assert sorted(store.checkpoints(by_process.id)) == list(range(-1, 6))
    monkeypatch.delenv("FLOR_NB_SAVER")
    out = flor.replay("proc", code=PROBE, epochs=[3], store=home)
    assert out.attrs["fidelity"]["faithful"], out.attrs["verdict"]
    truth = _record_probed(tmp_path / "truth")
    assert out.dropna(subset=["w"])["w"].tolist() == truth[truth["epoch"] == 3].dropna(subset=["w"])["w"].tolist()


def _record_probed(home):
    ns = {"flor": flor}
    exec(SETUP, ns)
    flor.record(PROBE, name="truth", namespace=ns, cells=[SETUP], store=home, progress=False)
    return flor.dataframe("w", run="truth", store=home)


@pytest.mark.timeout(240)
def test_a_saver_killed_mid_recording_loses_no_checkpoint(tmp_path, caplog):
    home = tmp_path / ".flor"
    with caplog.at_level(logging.WARNING, logger="flor_nb"):
        run = _record(home, "killed", kill_at=3)
    assert run.status == "finished" and run.epochs_completed == 6
    why = run.timings["saver"]["why_not"]
    assert "was killed by signal 9" in why, run.timings["saver"]
    assert 1 <= run.timings["saver"]["process"] <= 4  # epochs 0-2 (and the start) by the process, at most
    assert sorted(Store(home).checkpoints(run.id)) == list(range(-1, 6))  # none lost: the thread wrote the rest
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "was killed by signal 9" in said and "written by the kernel's writer thread instead" in said, said
    after = _record(home, "after")  # the next recording starts a new saver (in the background in a kernel)
    assert after.timings["saver"]["process"] >= 1 and after.timings["saver"]["why_not"] is None, after.timings
    (idle,) = _savers()
    os.kill(idle.pid, signal.SIGKILL)  # killed between recordings: the next one sees it is gone before using it
    idle.join(5)
    later = _record(home, "later")
    assert later.timings["saver"]["process"] >= 1 and later.timings["saver"]["why_not"] is None, later.timings
    assert [p.pid for p in _savers()] != [idle.pid]
    for epoch in (2, 4):  # one checkpoint written by the saver, one by the thread after it died
        out = flor.replay("killed", code=PROBE, epochs=[epoch], store=home)
        assert out.attrs["fidelity"]["faithful"], out.attrs["verdict"]


def test_an_interrupt_of_the_kernel_leaves_the_saver_alone(tmp_path):
    """Jupyter interrupts a kernel (the way to stop a training cell) by sending SIGINT to its process group,
    which holds the saver. The saver ignores it, mid-recording and idle; it used to die of KeyboardInterrupt, so
    the writer thread took over with a warning and the next recording started a new saver with new buffers."""
    home = tmp_path / ".flor"
    run = _record(home, "interrupted", kill_at=3, sig=signal.SIGINT)
    assert run.timings["saver"]["why_not"] is None and run.timings["saver"]["process"] >= 6, run.timings
    (alive,) = _savers()
    os.kill(alive.pid, signal.SIGINT)  # between recordings
    alive.join(0.5)
    assert alive.is_alive()
    again = _record(home, "again")
    assert [p.pid for p in _savers()] == [alive.pid], again.timings
    assert again.timings["saver"]["why_not"] is None and again.timings["saver"]["process"] >= 6, again.timings


def test_a_bad_saver_setting_is_refused_before_anything_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOR_NB_SAVER", "proc")
    with pytest.raises(flor.errors.InputError, match=r"FLOR_NB_SAVER='proc' is not allowed: use 'process'"):
        _record(tmp_path, "bad")
    assert Store(tmp_path).all_runs() == []


@pytest.mark.slow  # a real kernel
@pytest.mark.timeout(300)
def test_interrupting_a_recording_kernel_stops_training_not_the_saver(store, tmp_path):
    """Kernel > Interrupt during a recorded cell, as a user stops training (jupyter_client signals the kernel's
    process group): the run ends 'interrupted' with every checkpoint written by the saver, which lives on and
    serves the next recording."""
    import time

    from test_resume import KERNEL_SETUP, KERNEL_TRAIN, _Kernel

    savers = "import multiprocessing as _mp\nprint([p.pid for p in _mp.active_children() if p.name == 'flor_nb-saver'])"
    k = _Kernel(tmp_path)
    try:
        k.run("%load_ext flor_nb")
        k.run(KERNEL_SETUP)
        short = KERNEL_TRAIN.replace("range(8)", "range(2)")
        k.run("%%flor record --name warm --no-progress\n" + short)  # the saver starts in the background
        deadline = time.monotonic() + 60
        while k.run(savers).strip() == "[]" and time.monotonic() < deadline:
            time.sleep(0.2)
        msg_id = k.kc.execute("%%flor record --name stopped --no-progress --overhead inf\n" + KERNEL_TRAIN)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if flor.get_run("stopped", store=store).epochs_completed >= 3:
                    break
            except flor.FlorError:  # not created yet
                pass
            time.sleep(0.1)
        k.km.interrupt_kernel()
        while True:  # the interrupted cell's reply: the kernel aborts what was queued behind it
            reply = k.kc.get_shell_msg(timeout=60)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
        after = k.run(savers, after_error=True).strip()
        run = flor.get_run("stopped", store=store)
        assert run.status == "interrupted" and 3 <= run.epochs_completed < 8, (run.status, run.epochs_completed)
        assert run.timings["saver"]["why_not"] is None, run.timings["saver"]
        assert run.timings["saver"]["process"] >= run.epochs_completed, run.timings["saver"]  # a checkpoint each
        assert after != "[]", after
        k.run("%%flor record --name next --no-progress\n" + short)
        assert k.run(savers).strip() == after  # the same saver process
        assert flor.get_run("next", store=store).timings["saver"]["why_not"] is None
    finally:
        k.close()


@pytest.mark.slow  # a real kernel
@pytest.mark.timeout(300)
def test_an_interrupt_right_after_load_ext_leaves_the_forkserver_alone(store, tmp_path):
    """Kernel > Interrupt in the seconds after `%load_ext flor_nb`, while the forkserver imports torch: it used to
    die of KeyboardInterrupt (the next replay started it cold); it starts with SIGINT blocked now."""
    import time

    from test_resume import _Kernel
    from test_workers import _alive

    k = _Kernel(tmp_path)
    try:
        # the cell goes on after %load_ext: the forkserver starts while a cell runs, when the kernel does not
        # ignore SIGINT (when idle it does, and a server started then inherits that)
        msg_id = k.kc.execute("%load_ext flor_nb\nimport time\ntime.sleep(10)")
        deadline = time.monotonic() + 60
        while not _forkservers_of(k.pid):
            assert time.monotonic() < deadline, "no forkserver after %load_ext"
            time.sleep(0.02)
        time.sleep(0.2)
        k.km.interrupt_kernel()  # the kernel's process group: the forkserver is still importing torch
        while k.kc.get_shell_msg(timeout=60)["parent_header"].get("msg_id") != msg_id:
            pass
        for _ in range(50):  # ipykernel aborts requests that reach it while it still clears its queue after the
            if k.kc.execute_interactive("pass", timeout=60)["content"]["status"] == "ok":  # interrupt (CI, once)
                break
            time.sleep(0.1)
        pid = k.run("import multiprocessing.forkserver as _fs\nprint(_fs._forkserver._forkserver_pid)").strip()
        time.sleep(6)  # it has imported what it preloads, or died of the interrupt
        assert _alive(int(pid)), "the forkserver died of the interrupt"
        assert k.run("print(_fs._forkserver._forkserver_pid)").strip() == pid
        k.run("%%flor record --name after --no-progress\nfor epoch in range(2):\n    flor.log('x', epoch)\n")
    finally:
        k.close()


def _forkservers_of(pid: int) -> list:
    """Child processes of ``pid`` running multiprocessing's forkserver (from /proc)."""
    import pathlib

    found = []
    for proc in pathlib.Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"forkserver" in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return found
