"""The benchmark workload instrumented the FlorDB way, and FlorDB's side of the comparison.

Runs with the FlorDB virtual environment's Python (``bash bench/flordb/setup.sh``
makes it), normally as a subprocess of ``bench/run_all.py``::

    bench/.venv-flordb/bin/python bench/flordb/train_flordb.py --quick --out /tmp/flordb.json

What it does, each step in a temporary git repository (FlorDB needs one: it
auto-commits every run to a ``flor.*`` branch and replays by checking commits out):

* writes ``train.py``: the setup cell + the training cell of ``bench/workload.py``
  with the loops wrapped in ``flor.loop("epoch", ...)`` / ``flor.loop("step", ...)``,
  one ``flor.arg`` (FlorDB's replay planner pivots on hyperparameters and refuses a
  run without one), and, at the end of each epoch, the ``torch.save`` of model,
  optimizer and scheduler that FlorDB relies on for checkpoints (FlorDB keeps a copy
  of each saved file per run; ``ckpt.pth`` is git-ignored as a user would);
* record overhead: ``python train.py`` against the same script with ``flor`` bound
  to a no-op stub (``plain``) and the stub plus the per-epoch ``torch.save``
  (``plain_save``), in alternating order, in separate processes;
* replay: records one run in a fresh repository, edits ``train.py`` to add a probe,
  then runs FlorDB's replay command as a user would, answering its confirmation
  prompt with ``y``:
  ``python -m flordb replay --apply weight_norm`` (epoch-level probe, all epochs) and
  ``python -m flordb replay --apply grad_norm --iter epoch=K --iter step=all``
  (step-level probe of epoch K). FlorDB re-executes from epoch 0 through K;
* log cost: the same tight ``flor.log`` loop as ``bench/log_cost.py`` in a script.

Never import flordb in a process whose working directory is inside a git
repository you care about: at import FlorDB switches that repository to a new
``flor.*`` branch and, at exit, commits everything in it (``git add -A``). This
driver therefore does not import flordb itself, and runs every FlorDB process in
a repository it created (checked with ``git rev-parse --show-toplevel``).

Every script writes its own timings (setup, loop, epochs run) as a JSON line to
``$BENCH_TIMING``; that includes the child process FlorDB's replay starts.
Results go to ``--out`` as JSON; failures are recorded there with their output.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from workload import EPOCH_PROBE, FULL, QUICK, STEP_PROBE, TRAIN, Config, setup_code

STUB = '''class flor:  # no-op stand-in for flordb: the baseline without recording
    @staticmethod
    def log(name, value):
        return value

    @staticmethod
    def arg(name, default=None):
        return default

    @staticmethod
    def loop(name, iterable):
        return iterable
'''

SAVE = ('    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), '
        '"scheduler": sched.state_dict()}, "ckpt.pth")\n')


def instrument(train: str, save: bool) -> str:
    """The training cell the FlorDB way: named loops, and the user's own checkpoint save."""
    out = train.replace("for epoch in range(EPOCHS):", 'for epoch in flor.loop("epoch", range(EPOCHS)):')
    out = out.replace("    for xb, yb in loader:", '    for xb, yb in flor.loop("step", loader):')
    assert out.count("flor.loop") == 2, out
    if save:
        out = out.rstrip("\n") + "\n" + SAVE
    return out


def script(cfg: Config, train: str, mode: str) -> str:
    head = "import flordb as flor\n" if mode == "flordb" else STUB
    return (
        "import json as _json, os as _os, sys as _sys, time as _time\n"
        "_T0 = _time.perf_counter()\n"
        + head
        + setup_code(cfg)
        + 'LR = flor.arg("lr", 1e-3)\n'
        + "_T1 = _time.perf_counter()\n"
        + instrument(train, save=(mode != "plain"))
        + "_T2 = _time.perf_counter()\n"
        + "if _os.environ.get('BENCH_TIMING'):\n"
        + "    with open(_os.environ['BENCH_TIMING'], 'a') as _f:\n"
        + "        _f.write(_json.dumps({'setup': _T1 - _T0, 'loop': _T2 - _T1, 'epochs_run': len(history),"
        + " 'argv': _sys.argv[1:]}) + '\\n')\n"
    )


LOG_WITH = '''import json as _json, os as _os, time as _time
import flordb as flor
LR = flor.arg("lr", 1e-3)
_T1 = _time.perf_counter()
for epoch in flor.loop("epoch", range(EPOCHS)):
    for i in flor.loop("step", range(STEPS)):
        v = i * 0.5
        flor.log("x", v)
_T2 = _time.perf_counter()
with open(_os.environ['BENCH_TIMING'], 'a') as _f:
    _f.write(_json.dumps({'loop': _T2 - _T1}) + '\\n')
'''
LOG_WITHOUT = LOG_WITH.replace('        flor.log("x", v)\n', "")


class Bench:
    def __init__(self, a):
        base = QUICK if a.quick else FULL
        self.cfg = Config(epochs=a.epochs or base["epochs"], scale=a.scale if a.scale is not None else base["scale"],
                          threads=a.threads if a.threads is not None else (1 if a.quick else 0))
        self.reps = a.reps or (1 if a.quick else 3)
        self.quick = a.quick
        self.work = Path(a.work or tempfile.mkdtemp(prefix="flordb-bench-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.py = sys.executable
        self.env = dict(os.environ)
        # FlorDB's replay starts `python <script>` from PATH: make that this venv's Python.
        self.env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + self.env.get("PATH", "")
        self.env.pop("PYTHONPATH", None)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.commands: list[str] = []
        self.errors: list[dict] = []
        self.logs = self.work / "logs"
        self.logs.mkdir(exist_ok=True)
        self._n = 0

    # -- plumbing ---------------------------------------------------------------
    def repo(self, name: str) -> Path:
        d = self.work / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        for cmd in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "bench@example.com"],
                    ["git", "config", "user.name", "bench"], ["git", "config", "commit.gpgsign", "false"]):
            subprocess.run(cmd, cwd=d, check=True)
        (d / ".gitignore").write_text("ckpt.pth\n__pycache__/\n")
        return d

    def commit(self, d: Path, msg: str):
        subprocess.run(["git", "add", "-A"], cwd=d, check=True)
        subprocess.run(["git", "commit", "-q", "-m", msg], cwd=d, check=True)

    def run(self, cmd: list[str], cwd: Path, what: str, stdin: str | None = None, git: bool = True) -> dict:
        """Run ``cmd`` in ``cwd``; return its wall time and the timing lines its scripts wrote."""
        if git:  # FlorDB commits to the repository around cwd: make sure it is one of ours
            top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=cwd, capture_output=True, text=True, check=False)
            if top.returncode != 0 or Path(top.stdout.strip()).resolve() != cwd.resolve():
                raise RuntimeError(f"refusing to run FlorDB in {cwd}: not the top of a repository made by this script")
        self._n += 1
        timing = self.logs / f"timing-{self._n}.jsonl"
        log = self.logs / f"out-{self._n}.txt"
        env = dict(self.env, BENCH_TIMING=str(timing))
        shown = " ".join(cmd) + (f"   (stdin: {stdin.strip()!r})" if stdin else "")
        self.commands.append(f"[{cwd.name}] {shown}")
        t = time.perf_counter()
        with open(log, "w") as out:
            p = subprocess.run(cmd, cwd=cwd, env=env, input=stdin, text=True, stdout=out, stderr=subprocess.STDOUT, check=False)
        wall = time.perf_counter() - t
        lines = [json.loads(x) for x in timing.read_text().splitlines()] if timing.exists() else []
        res = {"wall": wall, "rc": p.returncode, "timings": lines, "log": str(log)}
        if p.returncode != 0:
            tail = log.read_text()[-3000:]
            self.errors.append({"what": what, "cmd": shown, "rc": p.returncode, "output_tail": tail})
            print(f"  flordb: {what} FAILED (rc {p.returncode}); output tail:\n{tail[-800:]}", flush=True)
        return res

    def values(self, d: Path, name: str, source: str, last: int | None = None) -> list:
        """The values logged under ``name`` (``source`` 'forward' or 'replay'), in order; the ``last`` ones."""
        db = next((d / ".flor").glob("*.db"), None)
        if db is None:
            return []
        with sqlite3.connect(db) as c:
            vals = [json.loads(v) if isinstance(v, str) else v for (v,) in c.execute(
                "SELECT value FROM logs WHERE value_name = ? AND source = ? ORDER BY rowid", (name, source))]
        return vals[-last:] if last else vals

    def replay_rows(self, d: Path, name: str) -> int:
        db = next((d / ".flor").glob("*.db"), None)
        if db is None:
            return -1
        with sqlite3.connect(db) as c:
            return c.execute("SELECT COUNT(*) FROM logs WHERE value_name = ? AND source = 'replay'",
                             (name,)).fetchone()[0]

    # -- measurements -------------------------------------------------------------
    def record_overhead(self) -> dict:
        d = self.repo("record")
        (d / "train.py").write_text(script(self.cfg, TRAIN, "flordb"))
        self.commit(d, "train.py, instrumented for FlorDB")
        plain = self.work / "plain"
        plain.mkdir(exist_ok=True)
        (plain / "plain.py").write_text(script(self.cfg, TRAIN, "plain"))
        (plain / "plain_save.py").write_text(script(self.cfg, TRAIN, "plain_save"))
        res = {"plain": [], "plain_save": [], "flordb": []}
        order = ["plain", "flordb"] if self.quick else ["plain", "plain_save", "flordb"]
        for r in range(self.reps):
            for mode in (order if r % 2 == 0 else order[::-1]):
                if mode == "flordb":
                    out = self.run([self.py, "train.py"], d, "FlorDB record")
                else:
                    out = self.run([self.py, f"{mode}.py"], plain, f"{mode} run", git=False)
                if out["rc"] == 0 and out["timings"]:
                    res[mode].append({"wall": out["wall"], **out["timings"][-1]})
                print(f"  flordb record rep {r}: {mode} {out['wall']:.2f} s", flush=True)
        branch = subprocess.run(["git", "branch", "--show-current"], cwd=d, capture_output=True, text=True, check=False).stdout
        commits = subprocess.run(["git", "log", "--oneline"], cwd=d, capture_output=True, text=True, check=False).stdout
        obj = d / ".flor" / "obj_store"
        copies = sorted(str(p.relative_to(obj)) for p in obj.rglob("*.pth")) if obj.exists() else []
        sizes = [p.stat().st_size for p in obj.rglob("*.pth")] if obj.exists() else []
        res["git"] = {"branch": branch.strip(), "commits": len(commits.splitlines())}
        res["checkpoint_copies"] = {"files": len(copies), "bytes_each": sizes, "runs": len(res["flordb"])}
        return res

    def replays(self) -> dict:
        d = self.repo("replay")
        cfg = self.cfg
        (d / "train.py").write_text(script(cfg, TRAIN, "flordb"))
        self.commit(d, "train.py, instrumented for FlorDB")
        rec = self.run([self.py, "train.py"], d, "FlorDB record (for replay)")
        out = {"record": {"wall": rec["wall"], **(rec["timings"][-1] if rec["timings"] else {})}, "epoch_probe": [],
               "step_probe": {}, "recorded_val_acc": self.values(d, "val_acc", "forward")}
        n = cfg.epochs
        ks = [n - 1] if self.quick else sorted({1 if n > 2 else 0, n - 1})
        jobs = ["epoch"] + [f"step{k}" for k in ks]
        for r in range(self.reps):
            for job in (jobs if r % 2 == 0 else jobs[::-1]):
                if job == "epoch":
                    (d / "train.py").write_text(script(cfg, EPOCH_PROBE, "flordb"))
                    before = self.replay_rows(d, "weight_norm")
                    res = self.run([self.py, "-m", "flordb", "replay", "--apply", "weight_norm"], d,
                                   "FlorDB replay, epoch-level probe", stdin="y\n")
                    res["new_rows"] = self.replay_rows(d, "weight_norm") - before
                    res["expected_rows"] = n
                    out["epoch_probe"].append(res)
                    print(f"  flordb replay rep {r}: epoch probe, all epochs {res['wall']:.2f} s "
                          f"({res['new_rows']} rows)", flush=True)
                else:
                    k = int(job[4:])
                    (d / "train.py").write_text(script(cfg, STEP_PROBE, "flordb"))
                    before = self.replay_rows(d, "grad_norm")
                    res = self.run([self.py, "-m", "flordb", "replay", "--apply", "grad_norm", "--iter", f"epoch={k}",
                                    "--iter", "step=all"], d, f"FlorDB replay, step-level probe of epoch {k}",
                                   stdin="y\n")
                    res["new_rows"] = self.replay_rows(d, "grad_norm") - before
                    new = res["new_rows"]
                    res["values"] = self.values(d, "grad_norm", "replay", last=new) if new > 0 else []
                    out["step_probe"].setdefault(str(k), []).append(res)
                    print(f"  flordb replay rep {r}: step probe, epoch {k} {res['wall']:.2f} s "
                          f"({res['new_rows']} rows)", flush=True)
        return out

    def log_cost(self, calls: int) -> dict:
        d = self.repo("logcost")
        epochs = 5
        steps = max(1, calls // epochs)
        head = f"EPOCHS = {epochs}\nSTEPS = {steps}\n"
        (d / "with_log.py").write_text(head + LOG_WITH)
        (d / "without_log.py").write_text(head + LOG_WITHOUT)
        self.commit(d, "log cost scripts")
        res = {"with": [], "without": [], "calls": epochs * steps}
        for r in range(self.reps):
            for which in (["with", "without"] if r % 2 == 0 else ["without", "with"]):
                o = self.run([self.py, f"{which}_log.py"], d, f"FlorDB log cost ({which} log)")
                if o["rc"] == 0 and o["timings"]:
                    res[which].append({"wall": o["wall"], **o["timings"][-1]})
        return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--epochs", type=int)
    p.add_argument("--scale", type=float)
    p.add_argument("--reps", type=int, help="repetitions (full: 3, quick: 1)")
    p.add_argument("--threads", type=int, help="torch threads for training (default: torch's; quick: 1)")
    p.add_argument("--log-calls", type=int, help="flor.log calls for the log-cost script (full 50,000; quick 2,000)")
    p.add_argument("--parts", default="record,replay,log", help="comma list of: record, replay, log")
    p.add_argument("--out", required=True)
    p.add_argument("--work")
    p.add_argument("--keep", action="store_true")
    a = p.parse_args(argv)
    b = Bench(a)
    os.chdir(b.work)  # never import or run flordb with cwd in the caller's repository (see above)
    from importlib.metadata import version

    result = {"flordb": version("flordb"), "python": sys.version.split()[0], "config": b.cfg.to_dict(),
              "reps": b.reps, "work": str(b.work)}
    parts = set(a.parts.split(","))
    t = time.perf_counter()
    try:
        for name, fn in (("record", b.record_overhead), ("replay", b.replays),
                         ("log", lambda: b.log_cost(a.log_calls or (2_000 if a.quick else 50_000)))):
            if name not in parts:
                continue
            try:
                result[name] = fn()
            except Exception as e:  # noqa: BLE001 - record what happened, go on with the other parts
                b.errors.append({"what": name, "exception": "".join(traceback.format_exception(e))[-3000:]})
                print(f"  flordb: {name} raised {e!r}", flush=True)
    finally:
        result["seconds"] = time.perf_counter() - t
        result["commands"] = b.commands
        result["errors"] = b.errors
        Path(a.out).write_text(json.dumps(result, indent=1, default=str))
        if not a.keep:
            shutil.rmtree(b.work, ignore_errors=True)
        else:
            print(f"  flordb scratch kept in {b.work}")


if __name__ == "__main__":
    main()
