"""5. Parallel replay: 8 epochs with a step-level probe, workers=2 vs workers=1.

Both pools are warmed first; the two configurations alternate. The figure is
the median of per-pair speed-ups t(workers=1) / t(workers=2). Replay reuses the
recorded torch thread count (bit-exact results), so on 2 cores a run recorded
at 2 threads gives 2 workers x 2 threads; the same figure is therefore also
measured on a run recorded with 1 torch thread (5b).

    .venv/bin/python bench/parallel.py [--quick]
"""
from __future__ import annotations

import argparse
from dataclasses import replace

from common import run_measurement, Ctx, Row, Timer, add_args, interleaved, med, secs, spread
from workload import STEP_PROBE, namespace


def seg_range(seg: dict) -> tuple:
    """(first, last) epoch of a replay segment, whichever way the engine names them."""
    return seg.get("first", seg.get("start")), seg.get("last", seg.get("end"))


def _speedup(ctx: Ctx, run: str, store: str, epochs: str, steps_per_epoch: int, n_epochs: int, tag: str):
    import flor_nb

    res = {1: {}, 2: {}}
    segs, notes = {}, set()
    for w in (1, 2):  # warm both pools
        flor_nb.replay(run, code=STEP_PROBE, epochs=epochs, workers=w, store=store)
    for r, w in interleaved(ctx.reps, [1, 2]):
        with Timer() as t:
            df = flor_nb.replay(run, code=STEP_PROBE, epochs=epochs, workers=w, store=store)
        res[w][r] = t.seconds
        fid = df.attrs["fidelity"]
        segs[w] = [(*seg_range(x.get("segment") or {}), x.get("pid")) for x in fid.get("timings") or []]
        if not fid["faithful"]:
            notes.add(f"workers={w} NOT FAITHFUL")
        got = int(df["grad_norm"].notna().sum()) if "grad_norm" in df else 0
        if got != steps_per_epoch * n_epochs:
            notes.add(f"workers={w}: {got} grad_norm rows, expected {steps_per_epoch * n_epochs}")
        print(f"  parallel{tag} rep {r}: workers={w} {secs(t.seconds)}", flush=True)
    speed = [res[1][r] / res[2][r] for r in range(ctx.reps)]
    pids2 = {p for _, _, p in segs.get(2, [])}
    detail = (f"workers=1 {secs(med(res[1].values()))}, workers=2 {secs(med(res[2].values()))}; "
              f"segments with 2 workers {[(a, b) for a, b, _ in segs.get(2, [])]} in {len(pids2)} process(es)")
    detail += ("; " + "; ".join(sorted(notes))) if notes else "; faithful, all rows present"
    return speed, detail, {"w1": [res[1][r] for r in range(ctx.reps)], "w2": [res[2][r] for r in range(ctx.reps)],
                           "segments": segs}


def measure(ctx: Ctx) -> list[Row]:
    from record_overhead import record_once

    cfg = ctx.cfg
    n = min(8, cfg.epochs)
    lo = max(0, min(2, cfg.epochs - n))
    epochs = f"{lo}-{lo + n - 1}"
    steps = len(namespace(replace(cfg, epochs=1))["loader"])
    rows = []
    speed, detail, data = _speedup(ctx, ctx.run, ctx.store, epochs, steps, n, "")
    threads = f"{cfg.threads} torch thread(s)" if cfg.threads else "default threads"
    rows.append(Row("5", f"parallel replay of {n} epochs (step probe), workers=2 vs 1, run recorded at {threads}",
                    f"{med(speed):.2f}x", ">= 1.7x", spread(speed, "{:.2f}", "x"), detail, data))
    if cfg.threads == 1:
        return rows
    # The same on a run recorded with 1 torch thread: 2 workers x 1 thread fit 2 cores.
    one = replace(cfg, threads=1, epochs=lo + n)
    _, run1, store1, _ = record_once(ctx, one, name="bench1t")
    speed, detail, data = _speedup(ctx, run1, store1, epochs, steps, n, " (1 thread)")
    rows.append(Row("5b", f"parallel replay of {n} epochs (step probe), workers=2 vs 1, run recorded at 1 torch thread",
                    f"{med(speed):.2f}x", ">= 1.7x", spread(speed, "{:.2f}", "x"), detail, data))
    return rows


def main(argv=None):
    p = add_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    a = p.parse_args(argv)
    run_measurement(a, measure)


if __name__ == "__main__":
    main()
