"""Replay workers heal: a dead worker is reported and replaced; no worker outlives its owner."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import flor_nb as flor
from conftest import TRAIN, record_importing
from flor_nb import errors

TESTS = pathlib.Path(__file__).resolve().parent


def test_a_killed_worker_is_named_and_the_next_replay_works(recorded, store):
    """The worker is killed for real (SIGKILL, as the out-of-memory killer does) in the middle of epoch 2."""
    dies = TRAIN.replace("    sched.step()\n", "    if epoch == 2:\n        import os, signal; os.kill(os.getpid(), "
                                                   "signal.SIGKILL)\n    sched.step()\n")
    with pytest.raises(errors.ReplayError, match=r"A replay worker \(pid \d+\) was killed by signal 9 \(SIGKILL\)"):
        flor.replay("small", code=dies, epochs="1-3", store=store)
    assert flor.replays("small", store=store)[-1]["status"] == "failed"
    for _ in range(2):  # the broken pool was replaced: later replays work
        df = flor.replay("small", epochs="3-4", store=store)
        assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]


def test_a_worker_that_died_while_idle_does_not_fail_the_next_replay(recorded, store):
    from flor_nb import executor

    flor.replay("small", epochs=4, store=store)  # the pool is up
    os.kill(next(iter(executor.local()._pool._processes)), signal.SIGKILL)
    df = flor.replay("small", epochs=3, store=store)  # at once, before the pool itself notices
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]


def _children(pid: int) -> set[int]:
    """Every process below ``pid`` (read from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out.update(kids)
        todo.extend(kids)
    return out


def _alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.timeout(180)
def test_killed_replay_parent_leaves_no_workers_and_its_replay_is_marked(recorded, store, tmp_path):
    script = tmp_path / "replays.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import flor_nb as flor
        from conftest import TRAIN
        slow = TRAIN.replace("        flor.log(\\"loss\\", loss.item())\\n",
                             "        flor.log(\\"loss\\", loss.item())\\n        __import__('time').sleep(0.5)\\n")
        flor.replay("small", code=slow, epochs="0-4", store={str(store.home)!r}, workers=2)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not [r for r in flor.replays("small", store=store)
                                                    if r["status"] == "running"]:
            time.sleep(0.1)
        time.sleep(2.0)  # the workers are busy replaying
        workers = _children(parent.pid)
        assert len(workers) >= 2, workers  # the forkserver and its workers
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    finally:
        if parent.poll() is None:
            parent.kill()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)], "replay workers outlived the process that owned them"
    assert flor.replays("small", store=store)[-1]["status"] == "interrupted"


def test_pool_is_sized_from_the_cpus_this_process_may_use(tmp_path):
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from flor_nb import executor, machine; print(machine.usable_cpus(), executor.local().workers)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.split() == ["1", "1"], out.stderr[-2000:]


def test_pool_is_capped_by_a_cgroup_cpu_quota(tmp_path):
    """A container's CPU quota (cgroup v2 cpu.max, v1 cpu.cfs_quota_us) caps the pool below the affinity mask."""
    root = tmp_path / "cgroup"
    (root / "cpu").mkdir(parents=True)
    (root / "cpu.max").write_text("150000 100000\n")  # v2: 1.5 CPUs
    (root / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")  # v1: the same quota, where the host has v1
    (root / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    code = ("import os, pathlib, sys; "
            "from flor_nb import executor, machine; machine._CGROUP = pathlib.Path(sys.argv[1]); "
            "print(len(os.sched_getaffinity(0)), machine.cpu_quota(), machine.usable_cpus(), executor.local().workers)")
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    affinity, quota, usable, workers = out.stdout.split()
    assert quota == "1.5" and usable == workers == "1", out.stdout  # floor(1.5), whatever the affinity allows
    (root / "cpu.max").write_text("max 100000\n")  # no limit: the affinity mask decides
    (root / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, cwd=tmp_path)
    affinity, quota, usable, workers = out.stdout.split()
    assert quota == "None" and usable == workers == affinity, out.stdout + out.stderr[-2000:]


def test_one_pool_per_process():
    from flor_nb import executor

    assert executor.local() is executor.local(1) is executor.local(8)


@pytest.mark.timeout(180)
def test_warm_workers_import_an_edited_module_again(store, tmp_path):
    mod, probed = record_importing(store, tmp_path, "helper_mod")

    def scales():
        df = flor.replay("mod", code=probed, epochs="0-3", store=store, workers=2)
        return set(df["scale"].dropna())

    assert scales() == {1}
    time.sleep(1.1)  # a new mtime second: Python's own bytecode cache must see the edit too
    mod.write_text("SCALE = 2\n")
    assert scales() == {2}  # every warm worker that had imported it reads the edited file


def _chatty(n):
    from flor_nb import worker

    for i in range(n):  # far more than a pipe holds (64 kB), and nobody reads them
        worker.emit({"replay": 0, "epoch": i, "pad": "x" * 2000})
    return n


def test_a_worker_with_unread_progress_events_still_exits():
    """Progress events nobody read must not keep a worker alive at shutdown: the pool's shutdown (at a
    kernel's exit, at the end of a test session) would wait for it forever."""
    import threading

    from flor_nb.executor import LocalExecutor

    ex = LocalExecutor(1)
    assert ex._pool.submit(_chatty, 200).result(timeout=120) == 200
    done = threading.Event()
    threading.Thread(target=lambda: (ex._pool.shutdown(wait=True), done.set()), daemon=True).start()
    assert done.wait(60), "the worker did not exit: its unread events blocked it"
