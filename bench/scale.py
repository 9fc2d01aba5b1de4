"""How recording scales with the size of the state: about 1M, 10M and 100M parameters, on the CPU.

For each size, an MLP (256 -> W -> W -> 10, ReLU) trained with AdamW for a few epochs of a few seconds
(the 100M one runs few steps, so its epochs stay short), a checkpoint at every epoch (``overhead=inf``):

* blocking ms per checkpoint on the training thread (the engine's own accounting: walk the state, copy it
  into the snapshot pool, wait for the writer), the first one (cold pool: fresh pages) apart, and per GB;
* writer-thread seconds per checkpoint (hash, write, fsync) and peak extra memory: peak RSS of the recorded
  process minus that of the plain one (both import flor_nb), and the bytes the snapshot pool allocated.
  The pool holds a copy of the state: one snapshot per checkpoint kind in flight (step exit and epoch end),
  and at most one checkpoint waits for the writer, so it is bounded by 2 x 2 copies of the captured state;
  buffers are reused, never grown past that;
* store bytes per checkpoint (new bytes on disk, dedup and zero markers applied) / the raw state
  (parameters + AdamW state), and the whole store at the end;
* record overhead: wall and process CPU time of the recorded cell against the plain cell, pairs in
  ABBA order, each in a fresh process;
* replay of the last epoch with a step-level probe (so its steps run): the worker's epoch time and its
  restore time, against a plain training epoch and against a plain epoch that runs the same probe.

    .venv/bin/python bench/scale.py [--sizes 1,10,100] [--reps 2] [--epochs 3] [--threads 1] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SETUP = '''
import torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
torch.set_num_threads(THREADS)
X = torch.randn(BATCH * STEPS, 256); y = torch.randint(0, 10, (BATCH * STEPS,))
model = nn.Sequential(nn.Linear(256, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
'''
TRAIN = '''
for epoch in range(EPOCHS):
    perm = torch.randperm(len(X))
    for i in range(0, len(X), BATCH):
        idx = perm[i:i + BATCH]
        loss = F.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad(); loss.backward(); opt.step()
        flor.log("loss", loss.item())
'''
PROBE = TRAIN.replace("        opt.zero_grad(); loss.backward(); opt.step()\n",
                      "        opt.zero_grad(); loss.backward()\n"
                      "        flor.log('gn', float(sum(p.grad.norm() ** 2 for p in model.parameters()) ** 0.5))\n"
                      "        opt.step()\n")

CHILD = r'''
import json, os, shutil, sys, tempfile, time
sys.path.insert(0, {root!r})
import torch
import flor_nb
from flor_nb import state
mode, cfg = {mode!r}, {cfg!r}
setup, train, probe = {setup!r}, {train!r}, {probe!r}
for k, v in cfg.items():
    setup, train, probe = (s.replace(k, str(v)) for s in (setup, train, probe))


class CountingPool(state.BufferPool):
    """The snapshot pool, counting the bytes it allocates (a buffer is allocated only when none is free)."""
    allocated = 0

    def _buffer(self, t, pinned):
        if not self._free.get((t.dtype, tuple(t.shape), pinned)):
            CountingPool.allocated += t.numel() * t.element_size()
        return super()._buffer(t, pinned)


state.BufferPool = CountingPool


class NoFlor:
    @staticmethod
    def log(n, v):
        return v


ns = {{"__name__": "__main__", "flor": NoFlor if mode in ("plain", "probe") else flor_nb}}
exec(setup, ns)
out = {{"params": sum(p.numel() for p in ns["model"].parameters())}}
t, cpu = time.perf_counter(), time.process_time()
if mode in ("plain", "probe"):
    exec(train if mode == "plain" else probe, ns)
else:
    store = tempfile.mkdtemp(prefix="flor-scale-")
    run = flor_nb.record(train, name="scale", namespace=ns, cells=[setup], store=store, overhead=float(cfg["OVERHEAD"]))
    out["wall"], out["cpu"] = time.perf_counter() - t, time.process_time() - cpu
    out["snapshot"] = run.timings["snapshot_seconds"]
    out["write"] = run.timings["write_seconds"]
    out["epoch_seconds"] = run.timings["epoch_seconds"]
    out["pool_bytes"] = CountingPool.allocated
    st = flor_nb.get_store(store)
    rows = st.checkpoints(run.id)
    out["ckpt_new_bytes"] = {{e: r["bytes"] for e, r in rows.items()}}
    out["ckpt_logical_bytes"] = {{e: r["logical_bytes"] for e, r in rows.items()}}
    out["store_bytes"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(store) for f in fs)
    out["checkpoints"] = len(rows)
    if mode == "replay":
        t1 = time.perf_counter()
        df = flor_nb.replay("scale", code=probe, epochs=str(cfg["EPOCHS"] - 1), store=store, workers=1)
        out["replay"] = time.perf_counter() - t1
        timing = df.attrs["fidelity"]["timings"][0]
        out["replay_epoch"] = list(timing["epoch_seconds"].values())[0]
        out["replay_restore"] = timing["restore_seconds"]
        out["replay_setup"] = timing["setup_seconds"]
        out["level"] = df.attrs["fidelity"].get("level")
    shutil.rmtree(store, ignore_errors=True)
if "wall" not in out:
    out["wall"], out["cpu"] = time.perf_counter() - t, time.process_time() - cpu
with open("/proc/self/status") as f:
    out["peak_rss"] = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))
model, opt = ns["model"], ns["opt"]
out["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
out["state_bytes"] = sum(v.numel() * v.element_size() for v in model.state_dict().values()) + sum(
    v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
print("RESULT " + json.dumps(out))
'''

# W -> parameters: 256 W + W^2 + 10 W (+ biases); batch and steps keep epochs at a few seconds on 2 cores
SIZES = {1: {"WIDTH": 880, "BATCH": 128, "STEPS": 30},
         10: {"WIDTH": 3030, "BATCH": 64, "STEPS": 16},
         100: {"WIDTH": 9870, "BATCH": 16, "STEPS": 6}}


def child(mode, cfg):
    code = CHILD.format(root=ROOT, mode=mode, cfg=cfg, setup=SETUP, train=TRAIN, probe=PROBE)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir())
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{mode} {cfg}: {out.stderr[-3000:]}")
    return json.loads(line[7:])


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def spread(xs, fmt):
    xs = sorted(xs)
    return f"{fmt(med(xs))} ({fmt(xs[0])} .. {fmt(xs[-1])})" if xs else "n/a"


def measure(size, a) -> dict:
    cfg = {**SIZES[size], "EPOCHS": a.epochs, "THREADS": a.threads,
           "OVERHEAD": "inf" if a.policy == "every" else "0.02"}
    plain, rec = [], []
    for rep in range(a.reps):
        for mode in (("plain", "record") if rep % 2 == 0 else ("record", "plain")):
            (plain if mode == "plain" else rec).append(child(mode, cfg))
    rep = child("replay", cfg)
    probe = child("probe", cfg)
    return {"size": size, "cfg": cfg, "plain": plain, "record": rec, "replay": rep, "probe": probe}


def row(m) -> dict:
    rec, plain, rep, probe = m["record"], m["plain"], m["replay"], m["probe"]
    state = rec[-1]["state_bytes"]
    cold = [r["snapshot"][0] for r in rec + [rep]]
    warm = [s for r in rec + [rep] for s in r["snapshot"][1:]]
    write = [s for r in rec + [rep] for s in r["write"][1:]]
    new = [b for r in rec + [rep] for e, b in r["ckpt_new_bytes"].items() if int(e) >= 0]
    logical = [b for r in rec + [rep] for e, b in r["ckpt_logical_bytes"].items() if int(e) >= 0]
    epochs = m["cfg"]["EPOCHS"]
    plain_epoch = [p["wall"] / epochs for p in plain]
    rec_epoch = [e for r in rec for e in r["epoch_seconds"]]
    extra = [r["peak_rss"] for r in rec]
    return {
        "params": rec[-1]["params"], "state": state, "epoch_plain": plain_epoch, "epoch_recorded": rec_epoch,
        "block_cold": cold, "block_warm": warm, "write": write,
        "new_per_ckpt": [b / state for b in new], "logical_per_ckpt": [b / state for b in logical],
        "store_per_ckpt": [r["store_bytes"] / r["checkpoints"] / state for r in rec],
        "pool": [r["pool_bytes"] / state for r in rec],
        "extra_rss": [x - med([p["peak_rss"] for p in plain]) for x in extra],
        "wall_over": [r["wall"] / p["wall"] - 1 for r, p in zip(rec, plain)],
        "cpu_over": [r["cpu"] / p["cpu"] - 1 for r, p in zip(rec, plain)],
        "replay_epoch": rep["replay_epoch"], "replay_restore": rep["replay_restore"],
        "replay_setup": rep["replay_setup"], "probe_epoch": probe["wall"] / epochs, "level": rep["level"],
    }


def table(rows) -> str:
    ms = lambda s: f"{s * 1e3:.0f} ms"  # noqa: E731
    pct = lambda x: f"{x:+.1%}"  # noqa: E731
    x = lambda v: f"{v:.2f}x"  # noqa: E731
    out = ["| params | raw state (params + AdamW) | plain epoch | blocking per checkpoint: first (cold) / later "
           "(per GB) | writer per checkpoint | store: new bytes per checkpoint / raw state (whole state) | "
           "snapshot pool / raw state | peak extra RSS | record overhead: wall / process CPU | replay 1 epoch "
           "(+ restore) / plain epoch / plain epoch with the probe |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gb = r["state"] / 1e9
        pe = med(r["epoch_plain"])
        out.append(
            f"| {r['params'] / 1e6:.1f}M | {r['state'] / 1e6:.0f} MB | {spread(r['epoch_plain'], lambda s: f'{s:.2f} s')} "
            f"| {ms(med(r['block_cold']))} / {spread(r['block_warm'], ms)} ({med(r['block_warm']) * 1e3 / gb:.0f} ms/GB) "
            f"| {spread(r['write'], ms)} | {spread(r['new_per_ckpt'], x)} ({med(r['logical_per_ckpt']):.2f}x) "
            f"| {spread(r['pool'], x)} | {spread(r['extra_rss'], lambda b: f'{b / 1e6:.0f} MB')} "
            f"({med(r['extra_rss']) / r['state']:.2f}x state) "
            f"| {spread(r['wall_over'], pct)} / {spread(r['cpu_over'], pct)} "
            f"| {r['replay_epoch']:.2f} s (+ {r['replay_restore']:.2f} s) = {r['replay_epoch'] / pe:.2f}x "
            f"({(r['replay_epoch'] + r['replay_restore']) / pe:.2f}x) / {r['replay_epoch'] / r['probe_epoch']:.2f}x "
            f"({(r['replay_epoch'] + r['replay_restore']) / r['probe_epoch']:.2f}x)"
            f"{'' if r['level'] == 'faithful' else ' verdict: ' + str(r['level'])} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1,10,100", help="millions of parameters: 1, 10, 100")
    p.add_argument("--reps", type=int, default=2, help="plain/recorded pairs per size (ABBA)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared 2-core machine)")
    p.add_argument("--policy", choices=("every", "default"), default="every",
                   help="every: a checkpoint at every epoch (overhead=inf); default: the engine's adaptive period")
    p.add_argument("--out", default=None, help="markdown file to write (and .json beside it)")
    a = p.parse_args()
    load0 = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    rows, raw = [], []
    for size in [int(s) for s in a.sizes.split(",")]:
        m = measure(size, a)
        raw.append(m)
        rows.append(row(m))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    load1 = os.getloadavg()
    head = (f"`{' '.join(['.venv/bin/python'] + sys.argv)}`; {started}; {os.cpu_count()} cores; "
            f"{a.reps} plain/recorded pairs per size (ABBA, each in a fresh process), {a.epochs} epochs, "
            f"{a.threads} torch thread(s), AdamW, "
            f"{'a checkpoint every epoch' if a.policy == 'every' else 'the default checkpoint policy (overhead 0.02)'}; "
            f"load average "
            f"{load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f} at the start, "
            f"{load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f} at the end. Medians, (min .. max).")
    text = f"{head}\n\n{table(rows)}\n"
    print("\n" + text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump({"command": sys.argv, "started": started, "load": [load0, load1], "raw": raw, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
