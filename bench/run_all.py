"""Run the whole benchmark suite in one go and write the results table.

    .venv/bin/python bench/run_all.py            # full: 20 epochs, ~1-3 s each, 5 reps (tens of minutes)
    .venv/bin/python bench/run_all.py --quick    # smoke test, tiny settings (< 2 minutes)

Measurements (see bench/README.md): 1 record overhead, 2 flor.log cost,
3 epoch-level probe over all epochs (warm, cold, ideal), 4 step-level probe of
one epoch, 5 parallel replay, 6 checkpoint size, 7 FlorDB side by side (in its
own virtual environment, as a subprocess, in the same run). Every figure is a
median over repetitions whose configurations alternate, with its spread.
The table is printed and written to bench/results.md (--quick: results-quick.md)
with the raw numbers in a JSON file beside it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

from common import (
    FLORDB_VENV,
    HERE,
    ROOT,
    Ctx,
    Row,
    add_args,
    cleanup,
    machine,
    make_ctx,
    mb,
    med,
    pct,
    secs,
    spread,
    table,
)

MEASURES = ["1", "2", "6", "3", "4", "5", "7"]


def flordb_rows(ctx: Ctx, res: dict, nb: dict) -> tuple[list[Row], list[list[str]]]:
    """Rows for FlorDB's figures, and the side-by-side lines (flor_nb figures from ``nb``)."""
    rows, side = [], []
    n = ctx.cfg.epochs
    errs = res.get("errors") or []
    rec = res.get("record") or {}
    plain, plain_save, fdb = rec.get("plain", []), rec.get("plain_save", []), rec.get("flordb", [])
    k = min(len(plain), len(fdb))
    if k:
        proc = [fdb[i]["wall"] / plain[i]["wall"] - 1 for i in range(k)]
        loop = [fdb[i]["loop"] / plain[i]["loop"] - 1 for i in range(k)]
        ks = min(len(plain_save), len(fdb))
        vs_save = [fdb[i]["wall"] / plain_save[i]["wall"] - 1 for i in range(ks)]
        copies = rec.get("checkpoint_copies", {})
        git = rec.get("git") or {}
        save = f"vs plain + the same per-epoch torch.save {pct(med(vs_save))}; " if vs_save else ""
        rows.append(Row("7", "FlorDB record overhead (whole process vs plain script)", pct(med(proc)), "",
                        spread([x * 100 for x in proc], "{:+.1f}", "%"),
                        f"training loop alone {pct(med(loop))}; {save}plain process "
                        f"{secs(med([p['wall'] for p in plain]))} (loop {secs(med([p['loop'] for p in plain]))}), "
                        f"FlorDB {secs(med([p['wall'] for p in fdb]))}; checkpoints: {copies.get('files')} file(s) of "
                        f"{mb(sum(copies.get('bytes_each') or [0]))} kept for {copies.get('runs')} run(s) (the last "
                        f"save of each run); every run auto-committed to git branch {git.get('branch')}",
                        {"process": proc, "loop": loop, "vs_plain_save": vs_save}))
        side.append(["record overhead", nb.get("1", "-"), f"{pct(med(proc))} (loop alone {pct(med(loop))})"])
    plain_wall = med([p["wall"] for p in plain]) if plain else float("nan")
    plain_loop = med([p["loop"] for p in plain]) if plain else float("nan")
    log = res.get("log") or {}
    if log.get("with") and log.get("without"):
        m = min(len(log["with"]), len(log["without"]))
        per = [(log["with"][i]["loop"] - log["without"][i]["loop"]) / log["calls"] * 1e6 for i in range(m)]
        rows.append(Row("7", f"FlorDB flor.log cost per call ({log['calls']:,} calls)", f"{med(per):.2f} us", "",
                        spread(per, "{:.2f}", " us"), "each call also echoes the value to stdout (tqdm.write)",
                        {"per_call_us": per}))
        side.append(["flor.log per call", nb.get("2", "-"), f"{med(per):.2f} us"])
    rep = res.get("replay") or {}
    ep = [r for r in rep.get("epoch_probe", []) if r.get("rc") == 0]
    if ep:
        walls = [r["wall"] for r in ep]
        child = [t["loop"] for r in ep for t in r.get("timings", [])]
        rows_ok = all(r.get("new_rows") == n for r in ep)
        rows.append(Row("7", f"FlorDB epoch-level probe over all {n} epochs / retrain (both whole processes)",
                        f"{med(walls) / plain_wall:.2f}x", "", spread([w / plain_wall for w in walls], "{:.2f}", "x"),
                        f"`flordb replay` {secs(med(walls))} vs plain process {secs(plain_wall)}; its child's training "
                        f"loop {secs(med(child))} vs plain loop {secs(plain_loop)} (it re-runs every step of every "
                        "epoch); "
                        f"probe rows {'all present' if rows_ok else [r.get('new_rows') for r in ep]}",
                        {"walls": walls, "child_loops": child}))
        side.append(["epoch-level probe, all epochs / retrain", nb.get("3", "-"),
                     f"{med(walls) / plain_wall:.2f}x (process), loop {med(child) / plain_loop:.2f}x"])
    elif "replay" in res:
        rows.append(Row("7", "FlorDB epoch-level probe", "failed", "", "", _err(errs, "epoch-level")))
    one_epoch = plain_loop / n
    for kk, runs in sorted((rep.get("step_probe") or {}).items(), key=lambda x: int(x[0])):
        ok = [r for r in runs if r.get("rc") == 0]
        if not ok:
            rows.append(Row("7", f"FlorDB step-level probe of epoch {kk}", "failed", "", "", _err(errs, f"epoch {kk}")))
            continue
        walls = [r["wall"] for r in ok]
        ran = [t.get("epochs_run") for r in ok for t in r.get("timings", [])]
        child = [t["loop"] for r in ok for t in r.get("timings", [])]
        rows.append(Row("7", f"FlorDB step-level probe, one epoch (k={kk}) / one training epoch",
                        f"{med(walls) / one_epoch:.1f}x", "", spread([w / one_epoch for w in walls], "{:.1f}", "x"),
                        f"`flordb replay --iter epoch={kk}` {secs(med(walls))} (training loop {secs(med(child))}, "
                        f"ran epochs 0-{max(ran) - 1 if ran and ran[0] else '?'}) vs one plain epoch "
                        f"{secs(one_epoch)}; "
                        f"probe rows {[r.get('new_rows') for r in ok]}",
                        {"walls": walls, "epochs_run": ran, "child_loops": child}))
        side.append([f"step-level probe, epoch {kk} / one epoch", nb.get(f"4:{kk}", "-"),
                     f"{med(walls) / one_epoch:.1f}x (ran {max(ran) if ran and ran[0] else '?'} epochs)"])
    # Same code, same seeds, same thread count: the two tools should compute the very same numbers.
    same = []
    fv = rep.get("recorded_val_acc") or []
    if fv and ctx.run:
        import flor_nb

        nv = [float(x) for x in flor_nb.dataframe("val_acc", run=ctx.run, store=ctx.store)["val_acc"].dropna()]
        same.append(f"recorded val_acc: {_compare(nv, [float(x) for x in fv])}")
    for kk, runs in (rep.get("step_probe") or {}).items():
        mine = (ctx.extra.get("grad_norm") or {}).get(int(kk))
        theirs = next((r.get("values") for r in runs if r.get("values")), None)
        if mine and theirs:
            same.append(f"replayed grad_norm of epoch {kk}: {_compare(mine, [float(x) for x in theirs])}")
    if same:
        rows.append(Row("7", "FlorDB vs flor_nb: same values?", "; ".join(same), "identical", "", "",
                        {"compared": same}))
    for e in errs:
        rows.append(Row("7", f"FlorDB error: {e.get('what')}", "failed", "", "",
                        (e.get("cmd") or "") + " -> " + (e.get("output_tail") or e.get("exception") or "")[-300:]))
    return rows, side


def _compare(a: list, b: list) -> str:
    if len(a) != len(b):
        return f"different lengths ({len(a)} vs {len(b)})"
    diff = max((abs(x - y) for x, y in zip(a, b)), default=0.0)
    return f"identical ({len(a)} values)" if diff == 0 else f"max abs diff {diff:.3g} over {len(a)} values"


def _err(errs, needle):
    for e in errs:
        if needle in str(e.get("what")):
            return (e.get("output_tail") or e.get("exception") or "")[-300:]
    return "no result"


def run_flordb(ctx: Ctx, a) -> dict:
    py = FLORDB_VENV / "bin" / "python"
    if not py.exists():
        print(f"FlorDB venv missing at {FLORDB_VENV}: running bench/flordb/setup.sh", flush=True)
        subprocess.run(["bash", str(HERE / "flordb" / "setup.sh")], check=True)
    out = ctx.work / "flordb.json"
    cmd = [str(py), str(HERE / "flordb" / "train_flordb.py"), "--out", str(out), "--epochs", str(ctx.cfg.epochs),
           "--scale", str(ctx.cfg.scale), "--threads", str(ctx.cfg.threads), "--work", str(ctx.work / "flordb")]
    if ctx.quick:
        cmd.append("--quick")
    if a.flordb_reps:
        cmd += ["--reps", str(a.flordb_reps)]
    print("  " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=False)
    if not out.exists():
        return {"errors": [{"what": "train_flordb.py", "exception": "no output written"}]}
    return json.loads(out.read_text())


def main(argv=None):
    p = add_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--only", help=f"comma list of measurements to run, of {','.join(sorted(MEASURES))} "
                                  "(1 always runs: the others use its recorded run)")
    p.add_argument("--skip-flordb", action="store_true", help="leave out 7 (FlorDB)")
    p.add_argument("--flordb-reps", type=int, help="repetitions on the FlorDB side (full: 3, quick: 1)")
    p.add_argument("--out", help="markdown file for the table (default bench/results.md; quick: results-quick.md)")
    a = p.parse_args(argv)
    only = set((a.only or ",".join(MEASURES)).split(",")) | {"1"}
    if a.skip_flordb:
        only.discard("7")
    ctx = make_ctx(a)
    out = Path(a.out) if a.out else HERE / ("results-quick.md" if a.quick else "results.md")
    command = "python " + " ".join(shlex.quote(x) for x in [str(Path(sys.argv[0]).resolve().relative_to(ROOT))
                                                             if Path(sys.argv[0]).resolve().is_relative_to(ROOT)
                                                             else sys.argv[0], *sys.argv[1:]])
    started = datetime.datetime.now().astimezone()
    threads = f"{ctx.cfg.threads} torch thread(s)" if ctx.cfg.threads else "torch's default threads"
    header = (f"{machine()}\nworkload: {ctx.cfg.epochs} epochs, scale {ctx.cfg.scale}, {threads}; "
              f"{ctx.reps} repetitions; scratch {ctx.work}")
    print(header, flush=True)

    import ckpt_size
    import log_cost
    import parallel
    import record_overhead
    import replay_speed

    steps = {"1": ("record overhead", record_overhead.measure), "2": ("flor.log cost", log_cost.measure),
             "6": ("checkpoint size", ckpt_size.measure), "3": ("epoch-level probe", replay_speed.measure_epoch_probe),
             "4": ("step-level probe", replay_speed.measure_step_probe), "5": ("parallel replay", parallel.measure)}
    rows: list[Row] = []
    flordb = None
    t0 = time.perf_counter()
    try:
        for key in MEASURES:
            if key not in only:
                continue
            t = time.perf_counter()
            if key == "7":
                print("== 7. FlorDB, same workload, subprocess in its own venv", flush=True)
                flordb = run_flordb(ctx, a)
            else:
                name, fn = steps[key]
                print(f"== {key}. {name}", flush=True)
                try:
                    rows += fn(ctx)
                except Exception as e:
                    traceback.print_exc()
                    rows.append(Row(key, f"{name}: FAILED", "error", "", "", f"{type(e).__name__}: {e}"))
                    if key == "1":
                        raise
            print(f"   ({time.perf_counter() - t:.0f} s)", flush=True)
    finally:
        nb = _nb_figures(rows)
        side = []
        if flordb is not None:
            frows, side = flordb_rows(ctx, flordb, nb)
            rows += frows
        text = _report(command, started, header, ctx, rows, side, flordb, time.perf_counter() - t0)
        print()
        print(text)
        out.write_text(text)
        raw = {"command": command, "date": started.isoformat(), "config": ctx.cfg.to_dict(), "reps": ctx.reps,
               "rows": [r.__dict__ for r in rows], "flordb": flordb}
        out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
        print(f"written to {out} and {out.with_suffix('.json').name}")
        cleanup(ctx, a.keep)


def _nb_figures(rows: list[Row]) -> dict:
    nb = {}
    for r in rows:
        if r.key == "1" and "record overhead" in r.what:
            how = "every epoch" if "every epoch" in r.what else "default policy"
            nb["1"] = (nb["1"] + ", " if "1" in nb else "") + f"{r.result} ({how})"
        elif r.key == "2":
            nb["2"] = r.result
        elif r.key == "3" and "warm" in r.what:
            nb["3"] = f"{r.result} warm"
        elif r.key == "3" and "cold" in r.what:
            nb["3"] = nb.get("3", "") + f", {r.result} cold"
        elif r.key == "4" and "k=" in r.what:
            k = r.what.split("k=")[1].split(")")[0]
            nb[f"4:{k}"] = r.result
    return nb


def _report(command, started, header, ctx, rows, side, flordb, seconds) -> str:
    lines = [
        "# flor_nb benchmark results" + (" (QUICK smoke test: tiny settings, figures not meaningful)" if ctx.quick
                                         else ""),
        "",
        f"- command: `{command}`",
        f"- date: {started:%Y-%m-%d %H:%M %Z}; took {seconds / 60:.1f} min",
        f"- machine: {header.splitlines()[0]}",
        f"- {header.splitlines()[1].split('; scratch')[0]}",
        "",
        table(rows),
        "",
    ]
    if side:
        lines += ["## Side by side (same run, same workload)", "", "| figure | flor_nb | FlorDB " +
                  f"{flordb.get('flordb', '')} |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in side]
        lines += [""]
    if flordb:
        lines += ["## How FlorDB was driven", "",
                  ("In a temporary git repository per part, with FlorDB's venv first on PATH (its replay starts "
                   "`python train.py --replay_flor ...`):"), "", "```"]
        seen = []
        for c in flordb.get("commands", []):
            c = c.split("/bin/python ", 1)[-1]
            if c not in seen:
                seen.append(c)
        lines += [f"python {c}" for c in seen] + ["```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
