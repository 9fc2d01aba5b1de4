"""Shared pieces of the benchmark scripts: settings, statistics, result rows, the table."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from workload import FULL, QUICK, Config

FLORDB_VENV = Path(os.environ.get("FLORDB_VENV", HERE / ".venv-flordb"))


@dataclass
class Ctx:
    """What the measurements share within one benchmark run."""

    cfg: Config
    reps: int
    quick: bool
    work: Path  # scratch folder, removed at the end unless --keep
    plain_seconds: list = field(default_factory=list)  # plain training of cfg.epochs epochs, one per rep
    store: str | None = None  # a store holding exactly one recorded run of cfg
    run: str | None = None  # its label, NAME@VERSION
    extra: dict = field(default_factory=dict)

    def scratch(self, name: str) -> Path:
        d = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.work))
        return d

    @property
    def epoch_plain(self) -> float:
        """Seconds of one plain training epoch (median over reps, evaluation included)."""
        return statistics.median(self.plain_seconds) / self.cfg.epochs


@dataclass
class Row:
    key: str
    what: str
    result: str
    target: str = ""
    spread: str = ""
    detail: str = ""
    data: dict = field(default_factory=dict)


def add_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--quick", action="store_true", help=f"tiny settings for a smoke test ({QUICK}, 2 reps)")
    p.add_argument("--epochs", type=int, help=f"epochs of the workload (full: {FULL['epochs']})")
    p.add_argument("--scale", type=float, help=f"size of the workload's data (full: {FULL['scale']})")
    p.add_argument("--reps", type=int, help="repetitions of each timed configuration (full: 5, quick: 2)")
    p.add_argument("--threads", type=int, help="torch threads for training (default: torch's, one per core; "
                                               "quick: 1). 1 is much steadier on a busy machine")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (stores, checkpoints)")
    p.add_argument("--work", help="scratch folder (default: a new temp folder)")
    return p


def make_ctx(a) -> Ctx:
    base = QUICK if a.quick else FULL
    threads = a.threads if a.threads is not None else (1 if a.quick else 0)
    cfg = Config(epochs=a.epochs or base["epochs"], scale=a.scale if a.scale is not None else base["scale"],
                 threads=threads)
    reps = a.reps or (2 if a.quick else 5)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="flor-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    return Ctx(cfg=cfg, reps=reps, quick=a.quick, work=work)


def cleanup(ctx: Ctx, keep: bool):
    if keep:
        print(f"scratch kept in {ctx.work}")
    else:
        shutil.rmtree(ctx.work, ignore_errors=True)


# -- statistics ---------------------------------------------------------------
def summary(xs) -> dict:
    xs = sorted(float(x) for x in xs)
    if not xs:
        return {"n": 0}
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) >= 2 else [xs[0]] * 3
    return {"n": len(xs), "median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q[0], "q3": q[2]}


def spread(xs, fmt="{:.3g}", unit="") -> str:
    s = summary(xs)
    if not s["n"]:
        return "-"
    if s["n"] < 4:
        return f"min {fmt.format(s['min'])}{unit}, max {fmt.format(s['max'])}{unit} (n={s['n']})"
    return (f"IQR {fmt.format(s['q1'])}-{fmt.format(s['q3'])}{unit}, "
            f"range {fmt.format(s['min'])}-{fmt.format(s['max'])}{unit} (n={s['n']})")


def med(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def against_both(recorded, before, after) -> str:
    """Recorded cells against the mean of the plain cells run around them (a linear drift cancels), as a mean
    with its standard error, beside the plain cell against itself: what resolves a few percent on a noisy VM."""
    rel = [r / ((p + q) / 2) - 1 for r, p, q in zip(recorded, before, after)]
    ctl = [q / p - 1 for p, q in zip(before, after)]
    se = lambda v: statistics.stdev(v) / len(v) ** 0.5  # noqa: E731
    return (f"{statistics.mean(rel):+.2%} (s.e. {se(rel):.2%}); the plain cell against itself "
            f"{statistics.mean(ctl):+.2%} (s.e. {se(ctl):.2%})")


def pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def secs(x: float) -> str:
    return f"{x:.3g} s" if x >= 0.01 else f"{x * 1e3:.3g} ms"


def interleaved(reps: int, configs: list):
    """Yield (rep, config) with the order of ``configs`` rotated each repetition (ABBA-like)."""
    for r in range(reps):
        order = configs if r % 2 == 0 else list(reversed(configs))
        for c in order:
            yield r, c


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t


def du(path) -> int:
    """Bytes of the files under ``path``."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


# -- output -------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    out = ["| # | measurement | result | target | spread | detail |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r.key, r.what, r.result, r.target, r.spread, r.detail]
        out.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(out)


def print_rows(rows: list[Row]):
    print()
    print(table(rows))
    print()


def machine() -> str:
    import platform

    try:
        import torch

        tv = torch.__version__
        threads = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        tv, threads = "?", "?"
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, torch {tv} "
            f"({threads} threads), load average at start {load[0]:.2f}")


def dump_json(obj, path):
    Path(path).write_text(json.dumps(obj, indent=1, default=str))


def run_measurement(a, measure) -> None:
    """A script's main: record the workload's run (unless given), measure, print the rows, clean up."""
    from record_overhead import ensure_run

    ctx = make_ctx(a)
    try:
        ensure_run(ctx)
        print_rows(measure(ctx))
    finally:
        cleanup(ctx, a.keep)
