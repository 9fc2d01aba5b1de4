"""1. Record overhead: the training cell recorded by flor_nb vs the same cell run plainly.

Each repetition runs the cell in this process plainly (``flor`` is a no-op
stub, no checkpoints) and under ``flor_nb.record`` (logs + checkpoints, each
rep in a fresh store), in alternating order: once asking for a checkpoint at
every epoch boundary (``overhead=`` budget out of reach) and, where the engine
has an adaptive checkpoint period, once with its default policy. The figure
is the median of the per-rep ratios recorded/plain - 1.
Setup (data, model) is rebuilt before each run and not timed.

    .venv/bin/python bench/record_overhead.py [--quick]
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

from common import Ctx, Row, add_args, cleanup, interleaved, make_ctx, med, pct, print_rows, secs, spread
from workload import TRAIN, Config, namespace, run_plain, setup_code

EVERY_EPOCH = 1e9  # an overhead budget no checkpoint can exceed: a checkpoint at every epoch boundary


def forced_every_epoch_supported() -> bool:
    """Whether ``flor_nb.record`` takes a checkpoint budget (``overhead=``); without one it checkpoints every epoch."""
    import inspect

    import flor_nb

    return "overhead" in inspect.signature(flor_nb.record).parameters


def record_once(ctx: Ctx, cfg: Config, name="bench", store=None, every_epoch=False):
    """Record the training cell of ``cfg`` into ``store`` (a fresh one if None): (seconds, label, store, ns).

    ``every_epoch``: ask for a checkpoint at every epoch boundary (``overhead=`` budget out of reach), where
    the engine has an adaptive checkpoint period; otherwise the engine's default policy.
    """
    import time

    import torch

    import flor_nb

    kw = {"overhead": EVERY_EPOCH} if every_epoch and forced_every_epoch_supported() else {}
    threads = torch.get_num_threads()  # a setup cell with cfg.threads changes them process-wide
    store = store or str(ctx.scratch("store"))
    try:
        ns = namespace(cfg, flor=flor_nb)
        t = time.perf_counter()
        run = flor_nb.record(TRAIN, name=name, namespace=ns, cells=[setup_code(cfg)], store=store, **kw)
        seconds = time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)
    return seconds, run.label, store, ns


def ensure_run(ctx: Ctx):
    """For scripts run on their own: one plain run (the retraining baseline) and one recorded run."""
    if ctx.run is not None:
        return
    print(f"  preparing: a plain run and a recorded run of {ctx.cfg.epochs} epochs", flush=True)
    ctx.plain_seconds = [run_plain(ctx.cfg)]
    _, ctx.run, ctx.store, _ = record_once(ctx, ctx.cfg)


def _engine(ctx: Ctx, label: str, store: str) -> tuple[str, dict]:
    import flor_nb

    run = flor_nb.get_run(label, store=store)
    t = getattr(run, "timings", None) or {}
    ck = t.get("snapshot_seconds") or t.get("checkpoint_seconds") or []
    ep = t.get("epoch_seconds") or []
    kept = len(flor_nb.checkpoints(label, store=store))
    text = f"checkpoints kept: {kept} of {ctx.cfg.epochs + 1} epoch boundaries"
    if ck and ep:
        text += (f"; engine's own timings: median epoch {secs(med(ep))}, median blocking snapshot {secs(med(ck))} "
                 f"({sum(ck) / sum(ep):.2%} of training time on the training thread), background writer busy "
                 f"{t.get('writer_seconds', 0) / sum(ep):.1%} of training time (on the other core)")
    return text, t


def measure(ctx: Ctx) -> list[Row]:
    cfg = ctx.cfg
    # warm-up: thread pools, allocator, first-call costs of both paths
    small = replace(cfg, epochs=1, scale=min(cfg.scale, 0.1))
    run_plain(small)
    record_once(ctx, small, name="warmup")

    configs = ["plain", "every"] + (["default"] if forced_every_epoch_supported() else [])
    res = {c: {} for c in configs}
    cpu = {c: {} for c in configs}  # process CPU seconds (all threads): less sensitive to other tenants
    last = {}
    for r, which in interleaved(ctx.reps, configs):
        c0 = time.process_time()
        if which == "plain":
            res[which][r] = run_plain(cfg)
        else:
            seconds, label, store, _ = record_once(ctx, cfg, every_epoch=(which == "every"))
            res[which][r] = seconds
            last[which] = (label, store)
        cpu[which][r] = time.process_time() - c0
        print(f"  record overhead rep {r}: {which} {secs(res[which][r])} (cpu {secs(cpu[which][r])})", flush=True)
    ctx.plain_seconds = [res["plain"][r] for r in range(ctx.reps)]
    # Later measurements replay the run recorded as a user would: the engine's default policy.
    ctx.run, ctx.store = last.get("default", last["every"])
    rows = []
    for which, what in (("every", "checkpoint every epoch"), ("default", "engine's default checkpoint policy")):
        if which not in res:
            continue
        ratios = [res[which][r] / res["plain"][r] - 1 for r in range(ctx.reps)]
        text, timings = _engine(ctx, *last[which])
        rows.append(Row(
            "1", f"record overhead, {cfg.epochs} epochs, {what}", pct(med(ratios)), "<= +1%",
            spread([x * 100 for x in ratios], "{:+.1f}", "%"),
            f"plain {secs(med(ctx.plain_seconds))}, recorded {secs(med(res[which].values()))}; {text}",
            {"ratios": ratios, "plain": ctx.plain_seconds, "recorded": [res[which][r] for r in range(ctx.reps)],
             "engine_timings": timings},
        ))
        cpu_ratios = [cpu[which][r] / cpu["plain"][r] - 1 for r in range(ctx.reps)]
        rows.append(Row(
            "1", f"record overhead in process CPU time (all threads), {what}", pct(med(cpu_ratios)), "<= +1%",
            spread([x * 100 for x in cpu_ratios], "{:+.1f}", "%"),
            f"plain {secs(med(cpu['plain'].values()))} CPU, recorded {secs(med(cpu[which].values()))} CPU",
            {"cpu_ratios": cpu_ratios},
        ))
    return rows


def main(argv=None):
    a = add_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    a = a.parse_args(argv)
    ctx = make_ctx(a)
    try:
        print_rows(measure(ctx))
    finally:
        cleanup(ctx, a.keep)


if __name__ == "__main__":
    main()
