"""Fault injection: kill, damage, fill and break a real recording, then count what survives.

```bash
.venv/bin/python bench/faults.py --trials 30             # SIGKILLs of a recording process at random points
.venv/bin/python bench/faults.py --trials 30 --kinds kill,damage,disk,worker --out bench/results-faults.md
```

Kinds of trial (every fault is real: a SIGKILL, bytes flipped in real files, a
tmpfs that fills, a worker process killed):

- ``kill``: a child process records a run (a small model plus a few MB of state
  that changes every epoch, so checkpoint writes take tens of ms) and marks, in a
  file, when each epoch's body starts and ends. The parent SIGKILLs it at a random
  moment, or the moment a checkpoint temp file appears (mid-checkpoint), or the
  moment an epoch's body ends. Then it reopens the store (temp files left?),
  checks the database, verifies every checkpoint, and replays every completed
  epoch: epochs the user saw finish must all be replayable, faithfully.
- ``damage``: flip or truncate a byte of a checkpoint file, a tensor blob, a
  pickled blob, or a stored value in the database; then read and replay: the
  damage must be detected (named) and, for checkpoints, routed around.
- ``disk``: record onto a tmpfs too small for the checkpoints: training must go
  on, every trained epoch's logs must be stored, later replays must work.
- ``worker``: SIGKILL a replay worker mid-replay: the replay must say a worker died,
  and the next replay must succeed.

The tests (tests/test_durable.py) run a few ``kill`` trials with assertions;
this script runs many and reports the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The recording child: deterministic training (so replays can be checked bit for bit) with
# per-epoch state of STATE_MB that changes every epoch, and markers around each epoch's body.
CHILD = r"""
import os, sys, time
import torch
import flor_nb as flor
torch.set_num_threads(1)
MARK = '''
import os
def mark(text, _path=os.environ.get("FLOR_FAULT_MARKS")):  # a no-op in replay workers
    if _path:
        fd = os.open(_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.write(fd, (text + "\\n").encode())
        os.close(fd)
'''
SETUP = '''
import time
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
X = torch.randn(256, 16); y = (X[:, 0] > 0).long()
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
state = torch.zeros(int(STATE_MB * 2 ** 20 / 4))
'''
TRAIN = '''
for epoch in range(EPOCHS):
    mark(f"start {epoch}")
    perm = torch.randperm(256)
    for i in range(0, 256, 64):
        loss = F.cross_entropy(model(X[perm[i:i + 64]]), y[perm[i:i + 64]])
        opt.zero_grad(); loss.backward(); opt.step()
        flor.log("loss", loss.item())
        time.sleep(STEP_SLEEP)
    state += 1.0
    flor.log("acc", float((model(X).argmax(1) == y).float().mean()))
    mark(f"end {epoch}")
mark("done")
'''
cfg = dict(EPOCHS=int(sys.argv[2]), STATE_MB=float(sys.argv[3]), STEP_SLEEP=float(sys.argv[4]))
cells = "".join(f"{k} = {v!r}\n" for k, v in cfg.items()) + MARK + SETUP
ns = {"flor": flor}
exec(cells, ns)
flor.record(TRAIN, name=sys.argv[5], namespace=ns, cells=[cells], store=sys.argv[1], overhead=float("inf"),
            max_store=sys.argv[6] if len(sys.argv) > 6 else None)
"""


def start_child(store, marks, name="faults", epochs=8, state_mb=4.0, step_sleep=0.01,
                max_store=None) -> subprocess.Popen:
    """Start a process recording ``name`` into ``store``; it appends epoch markers to ``marks``.
    ``max_store``: the store budget (None: the default, a quarter of the free space)."""
    Path(marks).parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FLOR_FAULT_MARKS": str(marks)}
    extra = [] if max_store is None else [str(max_store)]
    return subprocess.Popen([sys.executable, "-c", CHILD, str(store), str(epochs), str(state_mb), str(step_sleep),
                             name, *extra], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def read_marks(marks) -> list[str]:
    try:
        return Path(marks).read_text().split("\n")[:-1]
    except FileNotFoundError:
        return []


def seen(marks) -> tuple[int, int]:
    """(epochs the user saw finish: the loop moved on past them, epochs whose body ran to its end)."""
    lines = read_marks(marks)
    started = [int(x.split()[1]) for x in lines if x.startswith("start ")]
    ended = [int(x.split()[1]) for x in lines if x.startswith("end ")]
    moved_on = max(started, default=0) if "done" not in lines else max(ended, default=-1) + 1
    return moved_on, max(ended, default=-1) + 1


def temp_files(home) -> list[str]:
    """Temp files in the store: a checkpoint or blob being written (or left by a killed writer)."""
    found = []
    for top in ("checkpoints", "blobs"):
        try:
            subdirs = list(os.scandir(Path(home) / top))
        except OSError:
            continue
        for sub in subdirs:
            try:
                found += [e.path for e in os.scandir(sub.path) if e.name.endswith(".tmp")]
            except OSError:
                pass
    return found


def wait_until(predicate, timeout=60.0, every=0.001) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(every)
    return False


def kill_trial(home, marks, when: str, rng: random.Random, name="faults", epochs=8, state_mb=4.0) -> dict:
    """Record in a child, SIGKILL it ``when`` ('random', 'checkpoint', 'epoch_end' or 'after:K'), then look."""
    child = start_child(home, marks, name, epochs, state_mb)
    try:
        if not wait_until(lambda: "start 0" in read_marks(marks), timeout=120):
            raise RuntimeError(f"the recording child did not start: {child.stderr.read().decode()[-2000:]}")
        if when == "checkpoint":  # the moment a checkpoint or blob is being written
            target = rng.randint(1, epochs - 2)
            wait_until(lambda: f"start {target}" in read_marks(marks), timeout=120)
            wait_until(lambda: bool(temp_files(home)) or child.poll() is not None, timeout=120, every=0.0002)
        elif when == "epoch_end":  # right after an epoch's body ran to its end
            target = rng.randint(0, epochs - 2)
            wait_until(lambda: f"end {target}" in read_marks(marks), timeout=120, every=0.0002)
        elif when.startswith("after:"):  # as soon as epoch K is seen finished (the loop moved on)
            k = int(when.split(":")[1])
            wait_until(lambda: f"start {k + 1}" in read_marks(marks), timeout=120, every=0.0002)
        else:
            time.sleep(rng.uniform(0.0, 1.2 * epochs * 0.15))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        mid = bool(temp_files(home))  # killed mid-write: the writer left its temp file behind
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    moved_on, body_ended = seen(marks)
    return {"when": when, "mid_checkpoint": mid, "killed_at_exit": "done" in read_marks(marks),
            "seen": moved_on, "body_ended": body_ended, **inspect(home, name)}


def inspect(home, name) -> dict:
    """Reopen the store as a new process would and check everything: temp files, database, checkpoints, replay."""
    import flor_nb as flor
    from flor_nb import checkpoint
    from flor_nb.store import Store

    tmp_before = len(temp_files(home))
    st = Store(home)  # opening cleans temp files of dead processes
    tmp_after = len(temp_files(home))
    integrity = [r[0] for r in st.db.execute("PRAGMA integrity_check")]
    errors = [] if integrity == ["ok"] else [f"database: {integrity[:3]}"]
    try:
        run = st.find_run(name)
    except flor.errors.UnknownRunError:  # killed before the run was created
        st.close()
        return {"status": None, "completed": 0, "replayable": 0, "faithful": None, "tmp_before": tmp_before,
                "tmp_after": tmp_after, "integrity_errors": errors, "checkpoints": 0}
    ckpts = st.checkpoints(run.id)
    for row in ckpts.values():
        for rel in filter(None, (row["path"], row["end_path"])):
            try:
                checkpoint.read(st.home, rel)
            except Exception as e:  # noqa: BLE001 - an indexed checkpoint must always read back
                errors.append(f"checkpoint {rel}: {type(e).__name__}: {e}")
    faithful, replayable, verdict = None, 0, ""
    if run.epochs_completed:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                df = flor.replay(run.label, epochs="all", store=st, workers=1)
                faithful = bool(df.attrs["fidelity"]["faithful"])
                verdict = df.attrs["verdict"]
                replayable = run.epochs_completed if faithful else 0
            except Exception as e:  # noqa: BLE001 - counted, and reported
                faithful, verdict = False, f"{type(e).__name__}: {e}"
    st.close()
    return {"status": run.status, "completed": run.epochs_completed, "replayable": replayable, "faithful": faithful,
            "verdict": verdict, "tmp_before": tmp_before, "tmp_after": tmp_after, "integrity_errors": errors,
            "checkpoints": len(ckpts)}


def kill_trials(n: int, rng: random.Random, work: Path) -> dict:
    kinds = ["random", "checkpoint", "epoch_end"]
    rows = []
    for i in range(n):
        when = kinds[i % len(kinds)]
        d = Path(tempfile.mkdtemp(prefix=f"kill{i}-", dir=work))
        row = kill_trial(d / ".flor", d / "marks", when, rng, name=f"t{i}")
        rows.append(row)
        print(f"  kill {i + 1}/{n} ({when}): saw {row['seen']} finish, body ended {row['body_ended']}, stored "
              f"{row['completed']}, replayable {row['replayable']}, temp files {row['tmp_before']}->"
              f"{row['tmp_after']}, integrity errors {len(row['integrity_errors'])}", flush=True)
    lost_seen = sum(max(0, r["seen"] - r["replayable"]) for r in rows)
    lost_body = sum(max(0, r["body_ended"] - r["replayable"]) for r in rows)
    return {
        "trials": n, "mid_checkpoint": sum(r["mid_checkpoint"] for r in rows),
        "epochs_seen_finish": sum(r["seen"] for r in rows), "epochs_body_ended": sum(r["body_ended"] for r in rows),
        "epochs_stored": sum(r["completed"] for r in rows), "epochs_replayable": sum(r["replayable"] for r in rows),
        "seen_but_lost": lost_seen, "body_ended_but_lost": lost_body,
        "replays_not_faithful": sum(r["faithful"] is False for r in rows),
        "integrity_errors": sum(len(r["integrity_errors"]) for r in rows),
        "temp_left_after_kill": sum(r["tmp_before"] > 0 for r in rows),
        "temp_left_after_reopen": sum(r["tmp_after"] for r in rows),
        "rows": rows,
    }


# -- damage -----------------------------------------------------------------------------------
def record_small(home, name="dmg", epochs=6):
    import flor_nb as flor

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import SETUP, TRAIN, setup_namespace

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flor.record(TRAIN, name=name, namespace=setup_namespace(epochs), cells=[f"EPOCHS = {epochs}\n{SETUP}"],
                           store=home, overhead=float("inf"))


def flip(path: Path, rng: random.Random, truncate=False, span=None) -> int:
    data = bytearray(path.read_bytes())
    if truncate:
        cut = rng.randint(0, len(data) - 1)
        path.write_bytes(bytes(data[:cut]))
        return cut
    lo, hi = span or (0, len(data))
    i = rng.randrange(lo, hi)
    data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return i


def damage_trials(n: int, rng: random.Random, work: Path) -> dict:
    """Damage one file per trial; detected = named (error or warning), survived = replay still faithful."""
    import flor_nb as flor
    from flor_nb import checkpoint
    from flor_nb.store import Store

    targets = ["checkpoint", "checkpoint_truncate", "tensor_blob", "py_blob", "db_value"]
    rows = []
    for i in range(n):
        target = targets[i % len(targets)]
        d = Path(tempfile.mkdtemp(prefix=f"dmg{i}-", dir=work)) / ".flor"
        run = record_small(d)
        st = Store(d)
        ckpts = st.checkpoints(run.id)
        epoch = rng.randint(1, run.epochs_completed - 1)
        detected, survived, silent, no_intact = False, False, False, False
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if target.startswith("checkpoint"):
                flip(st.home / ckpts[epoch]["path"], rng, truncate=target.endswith("truncate"))
            elif target in ("tensor_blob", "py_blob"):
                held = {rel: set(checkpoint.split(checkpoint.read(st.home, rel))[2]) for row in ckpts.values()
                        for rel in filter(None, (row["path"], row["end_path"]))}
                snap = checkpoint.read(st.home, ckpts[epoch]["path"])
                _, python, blobs, _ = checkpoint.split(snap)
                py = {v["__pyblob__"] for v in python.values() if isinstance(v, dict) and "__pyblob__" in v}
                pool = sorted(py if target == "py_blob" else set(blobs) - py)
                # Prefer a blob the fewest checkpoint files hold: one every checkpoint shares leaves none intact.
                holders = {h: sum(h in holds for holds in held.values()) for h in pool}
                h = rng.choice([h for h in pool if holders[h] == min(holders.values())])
                flip(st.home / "blobs" / h[:2] / h, rng)
            else:
                want = {(r["epoch"], r["value"]) for r in st.logs([run.id]) if r["name"] == "acc"}
                st.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                st.close()
                flor.store._STORES.clear()
                raw = bytearray((d / "flor.db").read_bytes())
                _, v = sorted(want)[epoch]
                import struct

                at = raw.find(struct.pack(">d", v))
                raw[at + 7] ^= 1
                (d / "flor.db").write_bytes(bytes(raw))
            try:
                if target == "db_value":
                    got = flor.dataframe("acc", run=run.label, store=d).dropna(subset=["acc"])
                    values = {(int(r.epoch), r.acc) for r in got.itertuples()}
                    silent = bool(values - want)
                    survived = not silent
                else:
                    df = flor.replay(run.label, epochs=str(epoch), store=d, workers=1)
                    survived = bool(df.attrs["fidelity"]["faithful"])
                    detected = bool(df.attrs["fidelity"].get("damaged_checkpoints"))
            except flor.FlorError as e:
                detected = "damaged" in str(e) or "missing" in str(e)
                no_intact = isinstance(e, flor.errors.NoCheckpointError)  # every earlier checkpoint shares it
            detected = detected or any("damaged" in str(w.message) or "checksum" in str(w.message) for w in caught)
        rows.append({"target": target, "epoch": epoch, "detected": detected, "survived": survived, "silent": silent,
                     "no_intact": no_intact})
        print(f"  damage {i + 1}/{n} ({target}, epoch {epoch}): detected {detected}, survived {survived}"
              f"{' (no intact checkpoint left: every one shares the blob)' if no_intact else ''}"
              f"{', SILENT WRONG VALUE' if silent else ''}", flush=True)
    return {"trials": n, "detected": sum(r["detected"] for r in rows), "survived": sum(r["survived"] for r in rows),
            "silent_wrong": sum(r["silent"] for r in rows), "rows": rows}


# -- full disk ----------------------------------------------------------------------------------
def disk_trials(n: int, rng: random.Random, work: Path) -> dict:
    rows = []
    for i in range(n):
        mount = Path(tempfile.mkdtemp(prefix=f"disk{i}-", dir=work))
        size_mb = rng.randint(10, 24)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mount)],
                          capture_output=True).returncode != 0:
            return {"trials": 0, "skipped": "mounting a tmpfs was refused (not root?)"}
        try:
            marks = mount.parent / f"marks{i}"
            # No store budget (as tests/test_disk.py): the default one, a quarter of the free space, thins
            # checkpoints so that the disk never fills, and the trial would test nothing.
            child = start_child(mount / ".flor", marks, name=f"d{i}", epochs=10, state_mb=3.0, step_sleep=0.0,
                                max_store="inf")
            err = child.communicate(timeout=600)[1].decode()
            moved_on, _ = seen(marks)
            res = inspect(mount / ".flor", f"d{i}")
            rows.append({"size_mb": size_mb, "exit": child.returncode, "trained": moved_on, **res,
                         "disk_message": "full" in err})
            print(f"  disk {i + 1}/{n} ({size_mb} MB): trained {moved_on}, stored {res['completed']}, replayable "
                  f"{res['replayable']}, checkpoints {res['checkpoints']}, exit {child.returncode}", flush=True)
        finally:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    return {"trials": len(rows), "epochs_trained": sum(r["trained"] for r in rows),
            "epochs_stored": sum(r["completed"] for r in rows), "epochs_replayable": sum(r["replayable"] for r in rows),
            "said_disk_full": sum(r["disk_message"] for r in rows), "rows": rows}


# -- dead workers -------------------------------------------------------------------------------
def worker_trials(n: int, rng: random.Random, work: Path) -> dict:
    import threading

    import flor_nb as flor
    from flor_nb import executor

    import torch

    d = Path(tempfile.mkdtemp(prefix="workers-", dir=work)) / ".flor"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # so the replay really runs on two workers
    run = record_small(d, epochs=6)
    torch.set_num_threads(threads)
    slow = run.code.replace("        flor.log(\"loss\", loss.item())\n",
                            "        flor.log(\"loss\", loss.item())\n        __import__('time').sleep(0.15)\n")
    rows = []
    for i in range(n):
        ex = executor.local()
        pids = [p for p in (getattr(ex._pool, "_processes", None) or {})]

        def killer():  # mid-replay: 6 epochs of 6 steps of 0.15 s on 2 workers take about 3 s
            time.sleep(rng.uniform(0.5, 2.5))
            live = list(getattr(ex._pool, "_processes", None) or {}) or pids
            if live:
                os.kill(rng.choice(live), signal.SIGKILL)

        t = threading.Thread(target=killer)
        t.start()
        said, first, error = False, "finished", ""
        try:
            flor.replay(run.label, code=slow, epochs="0-5", store=d, workers=2)
        except flor.errors.ReplayError as e:
            said = "died" in str(e) or "killed" in str(e)
            first = str(e).split(". ")[0]
        t.join()
        try:
            ok = flor.replay(run.label, epochs="4", store=d).attrs["fidelity"]["faithful"]
        except Exception as e:  # noqa: BLE001 - counted, and its message kept
            ok, error = False, f"{type(e).__name__}: {e}"[:300]
        rows.append({"said_worker_died": said, "next_replay_ok": bool(ok), "first": first, "error": error})
        print(f"  worker {i + 1}/{n}: the replay: {first}; next replay faithful {ok} {error}", flush=True)
    return {"trials": n, "killed_mid_replay": sum(r["first"] != "finished" for r in rows),
            "said_worker_died": sum(r["said_worker_died"] for r in rows),
            "next_replay_ok": sum(r["next_replay_ok"] for r in rows), "rows": rows}


def report(results: dict, command: str) -> str:
    out = [f"# Fault injection ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs)", "", f"`{command}`", ""]
    k = results.get("kill")
    if k:
        out += ["## SIGKILL of a recording process", "", "| figure | value |", "|---|---|"]
        out += [f"| {label} | {k[key]} |" for key, label in (
            ("trials", "trials"), ("mid_checkpoint", "kills while a checkpoint temp file existed"),
            ("epochs_seen_finish", "epochs the user saw finish (the loop moved on)"),
            ("epochs_body_ended", "epochs whose body ran to its last line"),
            ("epochs_stored", "epochs stored"), ("epochs_replayable", "epochs replayable (faithful replay)"),
            ("seen_but_lost", "epochs seen finished but lost"),
            ("body_ended_but_lost", "epochs whose body ended but were lost (killed in the ms before the commit)"),
            ("replays_not_faithful", "replays not faithful"), ("integrity_errors", "integrity errors"),
            ("temp_left_after_kill", "trials that left temp files at the kill"),
            ("temp_left_after_reopen", "temp files left after the store was reopened"))]
        out.append("")
    dmg = results.get("damage")
    if dmg:
        out += ["## Damaged files", "", "| target | trials | detected (named) | survived (replay faithful) | "
                "no intact checkpoint left | silent wrong values |", "|---|---|---|---|---|---|"]
        for t in sorted({r["target"] for r in dmg["rows"]}):
            rs = [r for r in dmg["rows"] if r["target"] == t]
            out.append(f"| {t} | {len(rs)} | {sum(r['detected'] for r in rs)} | {sum(r['survived'] for r in rs)} | "
                       f"{sum(r['no_intact'] for r in rs)} | {sum(r['silent'] for r in rs)} |")
        out.append("")
    dk = results.get("disk")
    if dk:
        out += ["## Full disk (tmpfs of 10-24 MB)", "", json.dumps({k: v for k, v in dk.items() if k != "rows"}), ""]
    wk = results.get("worker")
    if wk:
        out += ["## Replay worker killed mid-replay", "", json.dumps({k: v for k, v in wk.items() if k != "rows"}), ""]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=30, help="kill trials (other kinds: a third of it, at least 3)")
    p.add_argument("--kinds", default="kill", help="comma-separated: kill, damage, disk, worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the markdown report here")
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    kinds = a.kinds.split(",")
    os.environ.setdefault("XDG_CONFIG_HOME", tempfile.mkdtemp(prefix="faults-config-"))
    results = {}
    with tempfile.TemporaryDirectory(prefix="flor-faults-") as work:
        work = Path(work)
        few = max(3, a.trials // 3)
        if "kill" in kinds:
            results["kill"] = kill_trials(a.trials, rng, work)
        if "damage" in kinds:
            results["damage"] = damage_trials(few, rng, work)
        if "disk" in kinds:
            results["disk"] = disk_trials(few, rng, work)
        if "worker" in kinds:
            results["worker"] = worker_trials(few, rng, work)
    command = "python bench/faults.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(results, command)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
        Path(a.out).with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
