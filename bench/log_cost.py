"""2. Cost of one ``flor.log`` call while recording.

Two recorded cells with the same loops, one calling ``flor.log("x", v)`` in the
step loop and one not: (t_with - t_without) / calls is what a log call costs,
everything included (buffering, writing rows to the store by the end of the
cell). Also shown for context: the same difference with no recording at all
(``flor_nb.log`` as a passthrough; a bare Python function call).

    .venv/bin/python bench/log_cost.py [--quick] [--calls N]
"""
from __future__ import annotations

import argparse
import time

from common import Ctx, Row, add_args, cleanup, interleaved, make_ctx, med, print_rows, spread

WITH_LOG = '''
for epoch in range(EPOCHS):
    for i in range(STEPS):
        v = i * 0.5
        flor.log("x", v)
'''
WITHOUT_LOG = '''
for epoch in range(EPOCHS):
    for i in range(STEPS):
        v = i * 0.5
'''


def calls_for(ctx: Ctx, calls: int | None) -> tuple[int, int]:
    total = calls or (50_000 if ctx.quick else 1_000_000)
    epochs = 5
    return epochs, total // epochs


def measure(ctx: Ctx, calls: int | None = None) -> list[Row]:
    import flor_nb

    epochs, steps = calls_for(ctx, calls)
    n = epochs * steps
    cell = f"EPOCHS = {epochs}\nSTEPS = {steps}\n"

    def recorded(code):
        ns = {"flor": flor_nb}
        exec(cell, ns)
        store = str(ctx.scratch("logstore"))
        t = time.perf_counter()
        flor_nb.record(code, name="logcost", namespace=ns, cells=[cell], store=store)
        return time.perf_counter() - t

    def unrecorded(code, flor):
        ns = {"flor": flor}
        exec(cell, ns)
        t = time.perf_counter()
        exec(compile(code, "<cell>", "exec"), ns)
        return time.perf_counter() - t

    class Bare:
        @staticmethod
        def log(name, value):
            return value

    recorded(WITH_LOG)  # warm-up
    res = {k: {} for k in ("rec_with", "rec_without", "idle_with", "idle_without", "bare_with")}
    configs = ["rec_with", "rec_without", "idle_with", "idle_without", "bare_with"]
    for r, c in interleaved(ctx.reps, configs):
        if c == "rec_with":
            res[c][r] = recorded(WITH_LOG)
        elif c == "rec_without":
            res[c][r] = recorded(WITHOUT_LOG)
        elif c == "idle_with":
            res[c][r] = unrecorded(WITH_LOG, flor_nb)
        elif c == "idle_without":
            res[c][r] = unrecorded(WITHOUT_LOG, flor_nb)
        else:
            res[c][r] = unrecorded(WITH_LOG, Bare)
    per_call = [(res["rec_with"][r] - res["rec_without"][r]) / n * 1e6 for r in range(ctx.reps)]
    idle = [(res["idle_with"][r] - res["idle_without"][r]) / n * 1e6 for r in range(ctx.reps)]
    bare = [(res["bare_with"][r] - res["idle_without"][r]) / n * 1e6 for r in range(ctx.reps)]
    rows = [Row(
        "2", f"flor.log cost per call while recording ({n:,} calls)",
        f"{med(per_call):.2f} us", "<= 2 us", spread(per_call, "{:.2f}", " us"),
        f"not recording (passthrough): {med(idle):.2f} us; bare Python function call: {med(bare):.2f} us; "
        f"recorded cell {med(res['rec_with'].values()):.2f} s with logs vs {med(res['rec_without'].values()):.2f} s "
        f"without",
        {"per_call_us": per_call, "idle_us": idle, "bare_us": bare, "calls": n,
         **{k: [v[r] for r in range(ctx.reps)] for k, v in res.items()}},
    )]
    return rows


def main(argv=None):
    p = add_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--calls", type=int, help="log calls per cell (default 1,000,000; quick 50,000)")
    a = p.parse_args(argv)
    ctx = make_ctx(a)
    try:
        print_rows(measure(ctx, a.calls))
    finally:
        cleanup(ctx, a.keep)


if __name__ == "__main__":
    main()
