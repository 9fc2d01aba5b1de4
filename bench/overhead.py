"""Record overhead as a user sees it: the training cell with and without ``%%flor record``, in one real kernel.

One ipykernel (started with jupyter_client, ``%load_ext flor_nb`` as a user has it, so the replay workers
are prestarted), then interleaved pairs in ABBA order: before each timed cell an untimed cell re-runs the
setup (same seed, fresh model and optimizer) and collects garbage. Per timed cell:

* wall: from the execute request to the kernel going idle, as the client sees it (the user's view);
* process CPU time of the kernel (all its threads), CPU time of its main thread, CPU time of each thread
  (``/proc/self/task/*/stat``), and of its child processes (the replay workers, via psutil);
* for a recorded cell, the engine's own accounting: blocking snapshot and digest time on the training
  thread, and the writer thread's busy and CPU time (``time.thread_time`` when it ends).

The figure is the median of the per-pair ratios recorded/plain - 1, with the IQR and range; a breakdown
says where the extra time went.

With ``--control`` every pair also runs the plain cell a second time: the plain cell against itself is the
noise floor the overhead is read against.

    .venv/bin/python bench/overhead.py [--pairs 8] [--epochs 4] [--scale 1.0] [--threads 1] [--control]
        [--thread-arm] [--budget-arm FRACTION ...] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import against_both  # noqa: E402
from workload import TRAIN, Config, setup_code  # noqa: E402

ACCOUNT = r'''
import gc as _gc, json as _json, os as _os, threading as _threading, time as _time
def _flor_account():
    """CPU times now: the process, its main thread, each thread, and the child processes."""
    tick = _os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in _threading.enumerate()}
    tasks = {}
    for tid in _os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tasks[tid] = [names.get(int(tid), "?"), (int(parts[11]) + int(parts[12])) / tick]
    children = 0.0
    try:
        import psutil
        for c in psutil.Process().children(recursive=True):
            try:
                t = c.cpu_times()
                children += t.user + t.system
            except psutil.Error:
                pass
    except ImportError:
        pass
    return {"perf": _time.perf_counter(), "process": _time.process_time(), "main": _time.thread_time(),
            "tasks": tasks, "children": children}
'''

AFTER = r'''
_a1 = _flor_account()
_out = {k: _a1[k] - _a0[k] for k in ("perf", "process", "main", "children")}
_out["threads"] = {tid: [name, t - _a0["tasks"].get(tid, [name, 0.0])[1]] for tid, (name, t) in _a1["tasks"].items()}
if _RECORDED:
    _run = flor.get_store().all_runs()[-1]
    _t = _run.timings
    _out["engine"] = {"label": _run.label, "epochs": _t["epoch_seconds"], "snapshot": _t["snapshot_seconds"],
                      "digest": _t["digest_seconds"], "write": _t["write_seconds"],
                      "writer_busy": _t["writer_seconds"], "writer_cpu": _t.get("writer_cpu_seconds"),
                      "saver": _t.get("saver"),
                      "duration": _run.duration, "checkpoints": len(flor.checkpoints(_run.label))}
print("ACCOUNT " + _json.dumps(_out))
'''


class Kernel:
    """A real ipykernel, driven as a notebook front end drives it."""

    def __init__(self, cwd, env):
        from jupyter_client import KernelManager

        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=cwd, env=env)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)

    def run(self, code, timeout=1800) -> tuple[float, str]:
        """Execute a cell; (wall seconds until the kernel is idle again, its stdout). Raises on an error."""
        start = time.perf_counter()
        msg_id = self.kc.execute(code)
        out, error = [], None
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=timeout)
            except queue.Empty:
                raise RuntimeError(f"the cell did not finish in {timeout} s") from None
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream" and content["name"] == "stdout":
                out.append(content["text"])
            elif kind == "error":
                error = "\n".join(content["traceback"])
            elif kind == "status" and content["execution_state"] == "idle":
                wall = time.perf_counter() - start
                break
        if error:
            raise RuntimeError(f"cell failed:\n{code[:200]}\n{error[-3000:]}")
        return wall, "".join(out)

    def close(self):
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def timed(kernel, setup, cell, recorded, saver="process") -> dict:
    kernel.run(setup + f"\n_gc.collect()\n_os.environ['FLOR_NB_SAVER'] = {saver!r}\n")
    kernel.run(f"_RECORDED = {recorded}\n_a0 = _flor_account()")
    wall, _ = kernel.run(cell)
    _, out = kernel.run(AFTER)
    acct = json.loads(next(x for x in out.splitlines() if x.startswith("ACCOUNT "))[8:])
    acct["wall"] = wall
    return acct


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def describe(xs, fmt) -> str:
    xs = sorted(xs)
    if not xs:
        return "n/a"
    q = statistics.quantiles(xs, n=4) if len(xs) >= 4 else [xs[0], med(xs), xs[-1]]
    return f"{fmt(med(xs))} (IQR {fmt(q[0])} .. {fmt(q[2])}, range {fmt(xs[0])} .. {fmt(xs[-1])}, n={len(xs)})"


def by_name(threads: dict) -> dict:
    out: dict = {}
    for name, t in threads.values():
        out[name] = out.get(name, 0.0) + t
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=8, help="plain/recorded pairs (ABBA order)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--scale", type=float, default=1.0, help="data size (1.0: about 1-2 s per epoch)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the kernel (0: torch's default)")
    p.add_argument("--record-args", default="", help="extra %%%%flor record options, e.g. '--no-progress'")
    p.add_argument("--out", default=None, help="markdown file to write (and .json beside it)")
    p.add_argument("--thread-arm", action="store_true",
                   help="a third arm in every pair: recorded with checkpoints written by the kernel's writer thread "
                        "(FLOR_NB_SAVER=thread) instead of the saver process")
    p.add_argument("--budget-arm", type=float, action="append", default=[], metavar="FRACTION",
                   help="another arm in every pair (repeatable): recorded with --overhead FRACTION")
    p.add_argument("--control", action="store_true",
                   help="a second plain cell in every pair: the plain cell against itself, the noise floor")
    a = p.parse_args()
    cfg = Config(epochs=a.epochs, scale=a.scale, threads=a.threads)
    setup = setup_code(cfg)
    tmp = tempfile.mkdtemp(prefix="flor-overhead-")
    env = {**os.environ, "FLOR_NB_HOME": os.path.join(tmp, ".flor"), "PYTHONPATH": HERE}
    load0, started = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M %Z")
    kernel = Kernel(tmp, env)
    plain_cell = TRAIN
    record_cell = f"%%flor record --name ovh {a.record_args}\n" + TRAIN
    pairs = []
    try:
        kernel.run("%load_ext flor_nb\n" + ACCOUNT)
        time.sleep(15)  # the prestarted replay workers import torch: let them settle before timing
        timed(kernel, setup, plain_cell, False)  # warm-up, not counted: first-run imports and caches
        timed(kernel, setup, record_cell, True)
        budget_cells = {f"budget {b:g}": f"%%flor record --name ovh --overhead {b!r} {a.record_args}\n" + TRAIN
                        for b in a.budget_arm}
        arms = (("plain", "record") + (("thread",) if a.thread_arm else ()) + tuple(budget_cells)
                + (("plain2",) if a.control else ()))
        cells = {"plain": plain_cell, "plain2": plain_cell, "record": record_cell, "thread": record_cell, **budget_cells}
        for i in range(a.pairs):
            order = arms if i % 2 == 0 else arms[::-1]
            got = {arm: timed(kernel, setup, cells[arm], not arm.startswith("plain"),
                              "thread" if arm == "thread" else "process")
                   for arm in order}
            pairs.append(got)
            r, q = got["record"], got["plain"]
            again = f", plain again {got['plain2']['wall']:.2f} s" if a.control else ""
            if a.thread_arm:
                again += f", recorded by the writer thread {got['thread']['wall']:.2f} s " \
                         f"({got['thread']['wall'] / q['wall'] - 1:+.1%})"
            for arm in budget_cells:
                again += f", {arm} {got[arm]['wall']:.2f} s ({got[arm]['wall'] / q['wall'] - 1:+.1%})"
            print(f"pair {i}: plain {q['wall']:.2f} s, recorded {r['wall']:.2f} s ({r['wall'] / q['wall'] - 1:+.1%}){again}; "
                  f"CPU {q['process']:.2f} / {r['process']:.2f} s; load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        kernel.close()
        shutil.rmtree(tmp, ignore_errors=True)
    load1 = os.getloadavg()
    text = report(a, pairs, load0, load1, started)
    print("\n" + text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump({"command": sys.argv, "started": started, "load": [load0, load1], "pairs": pairs}, f, indent=1)


def report(a, pairs, load0, load1, started) -> str:
    pct = lambda x: f"{x:+.2%}"  # noqa: E731
    ms = lambda s: f"{s * 1e3:.0f} ms"  # noqa: E731
    eng = [x["record"]["engine"] for x in pairs]
    plain_wall = med([x["plain"]["wall"] for x in pairs])
    lines = [
        f"`{' '.join(['.venv/bin/python'] + sys.argv)}`; {started}; {os.cpu_count()} cores; one ipykernel with "
        f"`%load_ext flor_nb`; {a.pairs} pairs in ABBA order, {a.epochs} epochs of the bench workload "
        f"(scale {a.scale}), {a.threads or 'default'} torch thread(s); load average "
        f"{load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f} at the start, {load1[0]:.2f} / {load1[1]:.2f} / "
        f"{load1[2]:.2f} at the end. Medians (IQR, range).",
        "",
        "| measure | plain cell | recorded cell | recorded - plain (per pair) | recorded / plain - 1 (per pair) |",
        "|---|---|---|---|---|",
    ]
    def row(what, base, arm, key, base_tag="", arm_tag="", rel=True):
        """One table row: ``arm`` against ``base`` in ``key``, medians and per-pair differences and ratios."""
        return (f"| {what} | {ms(med([x[base][key] for x in pairs]))}{base_tag} | "
                f"{ms(med([x[arm][key] for x in pairs]))}{arm_tag} | "
                f"{describe([x[arm][key] - x[base][key] for x in pairs], ms)} | "
                f"{describe([x[arm][key] / x[base][key] - 1 for x in pairs], pct) if rel else '-'} |")

    for key, what in (("wall", "wall, as the client sees it"), ("process", "kernel process CPU (all threads)"),
                      ("main", "main thread CPU (training)"), ("children", "child processes CPU (replay workers)")):
        lines.append(row(what, "plain", "record", key, rel=key != "children"))
    if "plain2" in pairs[0]:  # the noise floor: the plain cell against itself, in the same pairs
        for key, what in (("wall", "wall"), ("main", "main thread CPU")):
            lines.append(row(f"control: plain cell run again, {what}", "plain", "plain2", key, arm_tag=" (plain again)"))
    if "plain2" in pairs[0] and len(pairs) > 1:  # against both plain cells of its pair: a linear drift cancels
        for key, what in (("wall", "wall"), ("main", "main thread CPU")):
            both = against_both(*([x[arm][key] for x in pairs] for arm in ("record", "plain", "plain2")))
            lines.append(f"| recorded against the mean of both plain cells, {what}: mean (standard error) | | | | "
                         f"{both} |")
    if "thread" in pairs[0]:  # the same recording, its checkpoints written by the kernel's writer thread
        for key, what in (("wall", "wall"), ("main", "main thread CPU")):
            lines.append(row(f"recorded, checkpoints by the writer thread (FLOR_NB_SAVER=thread), {what}", "plain",
                             "thread", key))
        lines.append(row("recorded by the saver process against by the writer thread, wall", "thread", "record",
                         "wall", base_tag=" (thread)"))
    for arm in [k for k in pairs[0] if k.startswith("budget ")]:  # the same recording at another overhead budget
        lines.append(row(f"recorded with --overhead {arm[7:]}, wall", "plain", arm, "wall"))
        if "plain2" in pairs[0] and len(pairs) > 1:
            both = against_both(*([x[k]["wall"] for x in pairs] for k in (arm, "plain", "plain2")))
            lines.append(f"| recorded with --overhead {arm[7:]} against the mean of both plain cells, wall: mean "
                         f"(standard error) | | | | {both} |")
        lines.append(f"| recorded with --overhead {arm[7:]}: checkpoints per cell | | "
                     f"{med([x[arm]['engine']['checkpoints'] for x in pairs]):.0f} | | |")
    # per thread, by name: the writer thread has ended by the time the cell ends: its CPU comes from the engine
    names = sorted({n for x in pairs for side in ("plain", "record") for n in by_name(x[side]["threads"])})
    for n in names:
        plain = [by_name(x["plain"]["threads"]).get(n, 0.0) for x in pairs]
        rec = [by_name(x["record"]["threads"]).get(n, 0.0) for x in pairs]
        if max(plain + rec) >= 0.005:
            lines.append(f"| thread `{n}` CPU (/proc, 10 ms ticks) | {ms(med(plain))} | {ms(med(rec))} | "
                         f"{describe([r - q for r, q in zip(rec, plain)], ms)} | - |")
    lines += [
        "",
        "Where the recorded cell's time goes (engine accounting, per recorded cell):",
        "",
        "| part | median | share of the plain cell's wall |",
        "|---|---|---|",
    ]
    parts = {
        "training thread blocked in snapshots (copy + wait for the writer)": [sum(e["snapshot"]) for e in eng],
        "training thread blocked in digests": [sum(e["digest"]) for e in eng],
        "writer thread busy (wall)": [e["writer_busy"] for e in eng],
        "writer thread CPU": [e["writer_cpu"] or 0.0 for e in eng],
        "saver process CPU (it runs beside the kernel)": [(e.get("saver") or {}).get("cpu_seconds", 0.0) for e in eng],
        "epochs (engine's clock, sum)": [sum(e["epochs"]) for e in eng],
        "cell wall outside the epochs (instrument, setup, finish, print)":
            [x["record"]["wall"] - sum(x["record"]["engine"]["epochs"]) for x in pairs],
        "plain cell wall minus the recorded epochs (negative: epochs ran slower recorded)":
            [x["plain"]["wall"] - sum(x["record"]["engine"]["epochs"]) for x in pairs],
    }
    for what, xs in parts.items():
        lines.append(f"| {what} | {describe(xs, ms)} | {med(xs) / plain_wall:+.2%} |")
    lines.append(f"\ncheckpoints per recorded cell: {med([e['checkpoints'] for e in eng]):.0f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
