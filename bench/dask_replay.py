"""Replay on a Dask cluster: 2 Dask workers vs 1 on a parallel replay, and Dask's per-segment overhead
against the local pool.

A. 8 epochs with a step-level probe (the steps re-run), a run recorded at 1 torch thread, replayed on a
   LocalCluster of 2 worker processes and on one of 1 (1 thread each); both warm, alternating. Figure: the
   median of per-pair speed-ups t(1 worker) / t(2 workers).
B. One segment (1 epoch, an epoch-level probe: the step loop is skipped, so the segment is mostly fixed
   cost) through Dask (1 worker) and through the local pool (workers=1), alternating. Figure: the median
   difference, which is Dask's cost per segment (submit, ship the task, events, result) over the pool's.

    .venv/bin/python bench/dask_replay.py [--quick] [--epochs 10] [--scale 0.5] [--reps 5] [--out bench/results-dask.md]
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when Dask's workers import this file
from common import HERE, Ctx, Row, Timer, add_args, cleanup, interleaved, make_ctx, med, secs, spread, table, machine
from record_overhead import record_once
from workload import EPOCH_PROBE, STEP_PROBE

# (Named dask_replay.py: as bench/dask.py, with bench/ on sys.path, `import dask` found it.)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != str(HERE)]


def _cluster(n):
    import distributed

    from flor_nb.dask_executor import prestart

    cluster = distributed.LocalCluster(n_workers=n, processes=True, threads_per_worker=1, dashboard_address=None,
                                       worker_dashboard_address=None, silence_logs=40)
    client = distributed.Client(cluster)
    prestart(client, ["torch", "numpy"])
    return cluster, client


def measure(ctx: Ctx) -> list[Row]:
    import flor_nb

    cfg = replace(ctx.cfg, threads=1)
    n = min(8, cfg.epochs)
    epochs = f"0-{n - 1}"
    _, run, store, ns = record_once(ctx, replace(cfg, epochs=max(cfg.epochs, n)), name="benchdask", every_epoch=True)
    steps = len(ns["loader"])
    clusters = {w: _cluster(w) for w in (1, 2)}
    rows = []
    try:
        # A: 2 Dask workers vs 1; the local pool's 2 vs 1 alongside, as a control for the machine's load
        for w, (_, client) in clusters.items():  # warm: the replay processes import the cells' modules
            flor_nb.replay(run, code=STEP_PROBE, epochs=epochs, store=store, executor=client)
            flor_nb.replay(run, code=STEP_PROBE, epochs=epochs, store=store, workers=w)
        configs = [("dask", 1), ("dask", 2), ("local", 1), ("local", 2)]
        res: dict = {c: [] for c in configs}
        notes = set()
        for r, (kind, w) in interleaved(ctx.reps, configs):
            kw = {"executor": clusters[w][1]} if kind == "dask" else {"workers": w}
            with Timer() as t:
                df = flor_nb.replay(run, code=STEP_PROBE, epochs=epochs, store=store, **kw)
            res[(kind, w)].append(t.seconds)
            if df.attrs["fidelity"]["level"] != "faithful":
                notes.add(f"{kind} {w}: NOT FAITHFUL")
            if int(df["grad_norm"].notna().sum()) != steps * n:
                notes.add(f"{kind} {w}: missing grad_norm rows")
            print(f"  A rep {r}: {kind} {w} worker(s) {secs(t.seconds)}", flush=True)
        for kind, name in (("dask", "2 Dask workers vs 1"), ("local", "control: local pool, workers=2 vs 1")):
            speed = [a / b for a, b in zip(res[(kind, 1)], res[(kind, 2)])]
            rows.append(Row(f"A{'' if kind == 'dask' else ' (control)'}",
                            f"parallel replay of {n} epochs (step probe, {steps} steps/epoch), {name}, run recorded "
                            "at 1 torch thread", f"{med(speed):.2f}x", ">= 1.7x" if kind == "dask" else "",
                            spread(speed, "{:.2f}", "x"),
                            f"1 worker {secs(med(res[(kind, 1)]))}, 2 workers {secs(med(res[(kind, 2)]))}; "
                            + ("; ".join(sorted(notes)) if notes else "faithful, all rows present")))
        # B: per-segment overhead, Dask (1 worker) vs the local pool (1 worker)
        configs = ["local", "dask"]
        flor_nb.replay(run, code=EPOCH_PROBE, epochs="3", store=store, workers=1)
        t_seg: dict = {"local": [], "dask": []}
        dispatch: dict = {"local": [], "dask": []}
        for r, c in interleaved(ctx.reps * 2, configs):
            kw = {"workers": 1} if c == "local" else {"executor": clusters[1][1]}
            with Timer() as t:
                df = flor_nb.replay(run, code=EPOCH_PROBE, epochs="3", store=store, **kw)
            t_seg[c].append(t.seconds)
            fid = df.attrs["fidelity"]
            assert fid["level"] == "faithful", df.attrs["verdict"]
            # a skipped step loop's restore is inside the epoch's seconds: restore_seconds would count it twice
            inside = sum(x["setup_seconds"] + sum(x["epoch_seconds"].values()) for x in fid["timings"])
            dispatch[c].append(fid["seconds"] - inside)  # executor's run() minus the time inside the segment
        diff = [d - loc for d, loc in zip(t_seg["dask"], t_seg["local"])]
        rows.append(Row("B", "one segment (1 epoch, epoch probe, step loop skipped): Dask 1 worker minus local pool "
                             "1 worker, whole flor.replay call", f"{med(diff) * 1e3:+.0f} ms per segment", "",
                        spread([x * 1e3 for x in diff], "{:.0f}", " ms"),
                        f"local pool {secs(med(t_seg['local']))}, Dask {secs(med(t_seg['dask']))} per replay "
                        f"(median of {len(diff)})"))
        rows.append(Row("B2", "the same segments: executor time outside the segment's own work (ship the task, start "
                              "it, events, return the rows), Dask vs local pool",
                        f"Dask {med(dispatch['dask']) * 1e3:.0f} ms, local pool {med(dispatch['local']) * 1e3:.0f} ms",
                        "", f"Dask {spread([x * 1e3 for x in dispatch['dask']], '{:.0f}', ' ms')}; local "
                            f"{spread([x * 1e3 for x in dispatch['local']], '{:.0f}', ' ms')}",
                        "outside = the executor's run() minus (rebuilding the cells + the epoch) as the segment "
                        "reports them; it includes reading the entry checkpoint, the same for both"))
    finally:
        for cluster, client in clusters.values():
            client.close()
            cluster.close()
    return rows


def main(argv=None):
    p = add_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--out", default=None, help="write the table here (markdown) with the command, date and load")
    a = p.parse_args(argv)
    ctx = make_ctx(a)
    start = machine()
    try:
        rows = measure(ctx)
    finally:
        cleanup(ctx, a.keep)
    text = table(rows)
    print("\n" + text + "\n")
    if a.out:
        load = os.getloadavg()[0]
        with open(a.out, "w") as f:
            f.write(f"# Replay on a Dask cluster\n\n`.venv/bin/python bench/dask_replay.py {' '.join(sys.argv[1:])}`, "
                    f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n{start}; load average "
                    f"at the end {load:.2f}. {ctx.reps} repetitions per configuration (B: {ctx.reps * 2}), "
                    "alternating.\n\n" + text + "\n")


if __name__ == "__main__":
    main()
