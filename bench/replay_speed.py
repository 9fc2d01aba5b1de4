"""3. Epoch-level probe over all epochs, and 4. step-level probe of one epoch.

3. ``EPOCH_PROBE`` (logs ``weight_norm(model)`` after validation) replayed over
   all N epochs of the recorded run, against retraining from scratch (the plain
   cell's time). *Cold*: the first replay in a fresh Python process (workers
   start, import torch, run the setup cell). *Warm*: a later replay in the same
   process, workers already up. *Ideal*: rebuild the namespace once (setup cell,
   imports cached) plus, per epoch, ``torch.load`` a {model, optimizer,
   scheduler} checkpoint, ``load_state_dict`` it and run only the epoch-level
   code (evaluation + probe): what a replay that skips the step loop could cost.
4. ``STEP_PROBE`` (logs ``grad_norm(model)`` at every step) replayed for one
   epoch k, early, middle and late, with 1 worker (same torch threads as
   training), warm, against one plain training epoch. The target is <= 1.15x and
   flat in k (no cost for reaching epoch k).

Every replay's fidelity verdict and row count is checked.

    .venv/bin/python bench/replay_speed.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from common import run_measurement, HERE, Ctx, Row, Timer, add_args, interleaved, med, secs, spread
from workload import EPOCH_PROBE, STEP_PROBE, TRAIN, namespace, run_plain


def _check(df, probe: str, expect_rows: int) -> str:
    fid = df.attrs.get("fidelity", {})
    got = int(df[probe].notna().sum()) if probe in df else 0
    notes = []
    if not fid.get("faithful", False):
        notes.append("NOT FAITHFUL")
    if got != expect_rows:
        notes.append(f"{probe}: {got} rows, expected {expect_rows}")
    return "; ".join(notes)


def replay(ctx: Ctx, code: str, epochs, workers=None):
    import flor_nb

    with Timer() as t:
        df = flor_nb.replay(ctx.run, code=code, epochs=epochs, workers=workers, store=ctx.store)
    return t.seconds, df


def cold_replay(ctx: Ctx, code: str, epochs, workers=None, prestart: float = 0.0) -> dict:
    """The replay in a fresh Python process: (replay() seconds, process seconds, child's report).

    ``prestart``: as after ``%load_ext flor_nb`` in a restarted kernel, the child starts the replay
    workers first (``flor_nb.executor.prestart()``), waits that many seconds, then replays.
    """
    code_file = ctx.scratch("code") / "probe.py"
    code_file.write_text(code)
    cmd = [sys.executable, str(HERE / "replay_speed.py"), "--cold-child", "--store", ctx.store, "--run", ctx.run,
           "--code-file", str(code_file), "--replay-epochs", str(epochs)]
    if workers:
        cmd += ["--workers", str(workers)]
    if prestart:
        cmd += ["--prestart", str(prestart)]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"cold replay child failed:\n{out.stdout}\n{out.stderr}")
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    rep["process_s"] = wall
    return rep


def _child(a):
    t0 = time.perf_counter()
    import flor_nb

    imported = time.perf_counter() - t0
    if a.prestart:
        from flor_nb.executor import prestart

        prestart(a.store)
        time.sleep(a.prestart)
    code = Path(a.code_file).read_text()
    t = time.perf_counter()
    df = flor_nb.replay(a.run, code=code, epochs=a.replay_epochs, workers=a.workers, store=a.store)
    replay_s = time.perf_counter() - t
    fid = df.attrs["fidelity"]
    print(json.dumps({"replay_s": replay_s, "import_s": imported, "faithful": fid["faithful"],
                      "rows": len(df), "timings": fid.get("timings")}, default=str))


def ideal_epoch_probe(ctx: Ctx) -> dict:
    """Setup once + per epoch: torch.load + load_state_dict + evaluation + probe."""
    import torch

    cfg = ctx.cfg
    ns = namespace(replace(cfg, epochs=1))
    exec(compile(TRAIN, "<train>", "exec"), ns)  # one epoch, so the optimizer has its state
    d = ctx.scratch("ideal")
    files = []
    for k in range(cfg.epochs):
        f = d / f"ckpt-{k}.pt"
        torch.save({"model": ns["model"].state_dict(), "opt": ns["opt"].state_dict(),
                    "sched": ns["sched"].state_dict()}, f)
        files.append(f)
    with Timer() as ts:
        ns = namespace(cfg)
    restore = work = 0.0
    for f in files:
        t = time.perf_counter()
        sd = torch.load(f, weights_only=True)
        ns["model"].load_state_dict(sd["model"])
        ns["opt"].load_state_dict(sd["opt"])
        ns["sched"].load_state_dict(sd["sched"])
        t1 = time.perf_counter()
        ns["evaluate"](ns["model"], ns["Xv"], ns["yv"])
        ns["weight_norm"](ns["model"])
        t2 = time.perf_counter()
        restore += t1 - t
        work += t2 - t1
    return {"setup": ts.seconds, "restore": restore, "epoch_code": work, "total": ts.seconds + restore + work,
            "ckpt_bytes": os.path.getsize(files[0])}


def measure_epoch_probe(ctx: Ctx) -> list[Row]:
    cfg = ctx.cfg
    n = cfg.epochs
    retrain = med(ctx.plain_seconds)
    cold, warm, notes = [], [], set()
    cold_reps = 1 if ctx.quick else min(ctx.reps, 3)
    first = None
    for r, which in interleaved(ctx.reps, ["cold", "warm"]):
        if which == "cold":
            if r >= cold_reps:
                continue
            rep = cold_replay(ctx, EPOCH_PROBE, "all")
            cold.append(rep)
            if not rep["faithful"]:
                notes.add("cold replay NOT FAITHFUL")
            print(f"  epoch probe rep {r}: cold replay {secs(rep['replay_s'])} (process {secs(rep['process_s'])})",
                  flush=True)
        else:
            if first is None:
                first, df = replay(ctx, EPOCH_PROBE, "all")  # starts this process's workers
                print(f"  epoch probe: first in-process replay {secs(first)}", flush=True)
            s, df = replay(ctx, EPOCH_PROBE, "all")
            warm.append(s)
            bad = _check(df, "weight_norm", n)
            if bad:
                notes.add(bad)
            print(f"  epoch probe rep {r}: warm replay {secs(s)}", flush=True)
    primed = []
    for r in range(cold_reps):
        rep = cold_replay(ctx, EPOCH_PROBE, "all", prestart=5.0)
        primed.append(rep["replay_s"])
        print(f"  epoch probe rep {r}: cold replay after %load_ext's prestart {secs(rep['replay_s'])}", flush=True)
    ideal = ideal_epoch_probe(ctx)
    workers = df.attrs["fidelity"].get("timings") or []
    cold_s = [c["replay_s"] for c in cold]
    note = ("; " + "; ".join(sorted(notes))) if notes else "; faithful, all rows present"
    return [
        Row("3", f"epoch-level probe over all {n} epochs, warm / retrain", f"{med(warm) / retrain:.2f}x",
            "~ ideal", spread([w / retrain for w in warm], "{:.2f}", "x"),
            f"warm {secs(med(warm))} vs retrain {secs(retrain)} ({len(workers)} segments){note}",
            {"warm": warm, "retrain": retrain, "first_in_process": first, "segments": workers}),
        Row("3", f"epoch-level probe over all {n} epochs, cold / retrain", f"{med(cold_s) / retrain:.2f}x", "",
            spread([c / retrain for c in cold_s], "{:.2f}", "x"),
            f"cold replay() {secs(med(cold_s))}, whole process {secs(med([c['process_s'] for c in cold]))} "
            f"(import flor_nb {secs(med([c['import_s'] for c in cold]))}); first replay in the benchmark "
            f"process {secs(first)}", {"cold": cold}),
        Row("3", f"epoch-level probe over all {n} epochs, first replay after a kernel restart + %load_ext / retrain",
            f"{med(primed) / retrain:.2f}x", "", spread([c / retrain for c in primed], "{:.2f}", "x"),
            f"replay() {secs(med(primed))} in a fresh process that called flor_nb.executor.prestart() "
            "(as %load_ext flor_nb does) 5 s earlier", {"primed": primed}),
        Row("3", "epoch-level probe, ideal (restore each checkpoint + eval + probe) / retrain",
            f"{ideal['total'] / retrain:.3f}x", "", "",
            f"ideal {secs(ideal['total'])} = setup {secs(ideal['setup'])} + restore {secs(ideal['restore'])} "
            f"+ eval & probe {secs(ideal['epoch_code'])}; warm replay is {med(warm) / ideal['total']:.1f}x the ideal",
            ideal),
    ]


def measure_step_probe(ctx: Ctx) -> list[Row]:

    cfg = ctx.cfg
    n = cfg.epochs
    ks = sorted({1 if n > 2 else 0, n - 1} if ctx.quick else {1 if n > 2 else 0, n // 2, n - 1})
    steps = len(namespace(replace(cfg, epochs=1))["loader"])
    epoch = ctx.epoch_plain
    replay(ctx, STEP_PROBE, str(ks[0]), workers=1)  # warm the 1-worker pool
    res = {k: [] for k in ks}
    parts = {k: [] for k in ks}
    notes = set()
    for r, k in interleaved(ctx.reps, ks):
        s, df = replay(ctx, STEP_PROBE, str(k), workers=1)
        res[k].append(s)
        tm = (df.attrs["fidelity"].get("timings") or [{}])[0]
        parts[k].append(tm)
        ctx.extra.setdefault("grad_norm", {})[k] = [float(x) for x in df["grad_norm"].dropna()]
        bad = _check(df, "grad_norm", steps)
        if bad:
            notes.add(f"k={k}: {bad}")
        print(f"  step probe rep {r}: epoch {k} in {secs(s)}", flush=True)
    meds = {k: med(v) for k, v in res.items()}
    rows = []
    for label, k in (("early", ks[0]), ("middle", ks[len(ks) // 2]), ("late", ks[-1])):
        if label == "middle" and k in (ks[0], ks[-1]):
            continue
        tm = parts[k][-1] if parts[k] else {}
        eps = tm.get("epoch_seconds") or {}
        ep = next(iter(eps.values()), None) if isinstance(eps, dict) else None
        detail = (f"replay {secs(meds[k])} vs one plain epoch {secs(epoch)}; worker: setup "
                  f"{secs(tm.get('setup_seconds', 0))}, restore {secs(tm.get('restore_seconds', 0))}"
                  + (f", epoch {secs(ep)}" if ep is not None else ""))
        rows.append(Row("4", f"step-level probe, one epoch ({label}, k={k}) / one training epoch",
                        f"{meds[k] / epoch:.2f}x", "<= 1.15x", spread([s / epoch for s in res[k]], "{:.2f}", "x"),
                        detail, {"seconds": res[k], "epoch_plain": epoch, "timings": parts[k]}))
    # The probe's own cost (a norm over every parameter at every step): one training epoch with the probe in
    # it, interleaved with one without, is what a run that had the probe from the start pays per epoch.
    one = replace(cfg, epochs=1)
    with_probe, without = [], []
    for _ in range(max(3, ctx.reps)):
        without.append(run_plain(one, TRAIN))
        with_probe.append(run_plain(one, STEP_PROBE))
    probed = med(with_probe)
    for label, k in (("early", ks[0]), ("late", ks[-1])):
        rows.append(Row("4b", f"step-level probe, one epoch ({label}, k={k}) / one training epoch with the probe",
                        f"{meds[k] / probed:.2f}x", "<= 1.15x", spread([s / probed for s in res[k]], "{:.2f}", "x"),
                        f"replay {secs(meds[k])} vs one epoch with the probe {secs(probed)} (without it "
                        f"{secs(med(without))}: the probe itself costs {med(with_probe) / med(without) - 1:+.0%})",
                        {"seconds": res[k], "epoch_probed": with_probe, "epoch_plain_1": without}))
    flat = max(meds.values()) / min(meds.values())
    rows.append(Row("4", "step-level probe: slowest k / fastest k", f"{flat:.2f}x", "~1.0 (flat in k)", "",
                    ", ".join(f"k={k}: {secs(v)}" for k, v in meds.items())
                    + (("; " + "; ".join(sorted(notes))) if notes else "; faithful, all rows present"),
                    {"medians": meds}))
    return rows


def measure(ctx: Ctx) -> list[Row]:
    return measure_epoch_probe(ctx) + measure_step_probe(ctx)


def main(argv=None):
    p = add_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--cold-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--store")
    p.add_argument("--run")
    p.add_argument("--code-file")
    p.add_argument("--workers", type=int)
    p.add_argument("--replay-epochs")
    p.add_argument("--prestart", type=float, default=0.0)
    a = p.parse_args(argv)
    if a.cold_child:
        return _child(a)
    run_measurement(a, measure)


if __name__ == "__main__":
    main()
