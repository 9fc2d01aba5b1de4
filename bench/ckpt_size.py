"""6. Checkpoint bytes per epoch vs the raw training state.

Raw state = tensor bytes of the model's state dict (parameters + buffers) plus
the optimizer's state dict. *Per epoch* = the bytes the run's checkpoints
added to disk (``flor_nb.checkpoints``: its ``bytes`` column, after dedup where
the engine dedups), leaving out the initial checkpoint taken before training,
divided by the epochs; beside it, the whole store folder on disk per epoch.
Measured for the full workload and for a frozen-backbone fine-tune (only the
last layer trains; Adam state is tiny and most tensors do not change between
epochs). *Changed* = bytes of the model and optimizer tensors that differ
after one more epoch: the floor for a deduplicating store.

    .venv/bin/python bench/ckpt_size.py [--quick]
"""
from __future__ import annotations

import argparse
from dataclasses import replace

from common import run_measurement, Ctx, Row, add_args, du, mb, med
from workload import TRAIN, Config, namespace, state_bytes


def changed_bytes(cfg: Config) -> tuple[int, dict]:
    """(bytes of model + optimizer tensors that change during one epoch, raw state sizes), from a plain run."""
    import torch

    ns = namespace(replace(cfg, epochs=1))
    exec(compile(TRAIN, "<train>", "exec"), ns)  # first epoch: creates the optimizer state

    def flat(prefix, tree, out):
        if isinstance(tree, torch.Tensor):
            out[prefix] = tree.detach().clone()
        elif isinstance(tree, dict):
            for k, v in tree.items():
                flat(f"{prefix}/{k}", v, out)
        elif isinstance(tree, (list, tuple)):
            for i, v in enumerate(tree):
                flat(f"{prefix}/{i}", v, out)
        return out

    before = flat("model", ns["model"].state_dict(), {})
    flat("opt", ns["opt"].state_dict(), before)
    exec(compile(TRAIN.replace("history = []\nbest = 0.0\n", ""), "<train>", "exec"), ns)  # one more epoch
    after = flat("model", ns["model"].state_dict(), {})
    flat("opt", ns["opt"].state_dict(), after)
    changed = sum(t.numel() * t.element_size() for k, t in after.items()
                  if k not in before or not torch.equal(before[k], t))
    return changed, state_bytes(ns)


def one(ctx: Ctx, cfg: Config, run: str, store: str, label: str, key: str) -> Row:
    import flor_nb

    ck = flor_nb.checkpoints(run, store=store)
    changed, raw = changed_bytes(cfg)
    # The checkpoint taken before any training (no optimizer state yet) is left out of the per-epoch figures.
    if "before_epoch" in ck:  # one checkpoint per epoch boundary: before_epoch, bytes
        initial = ck["before_epoch"] == 0
    elif "epoch" in ck:  # epoch of the checkpoint, -1 before the loop
        initial = ck["epoch"] < 0
    else:
        initial = ck.index < 1
    later = ck[~initial]
    written = float(later["bytes"].sum())  # bytes the checkpoints added to disk (after dedup, if any)
    logical = med(list(later["logical_bytes"])) if "logical_bytes" in ck else med(list(later["bytes"]))
    per_epoch = written / cfg.epochs
    disk = du(store)
    return Row(
        key, f"checkpoint bytes per epoch / raw state, {label}", f"{per_epoch / raw['total']:.2f}x", "",
        f"whole store on disk {disk / cfg.epochs / raw['total']:.2f}x per epoch",
        f"{mb(per_epoch)} written per epoch ({len(later)} checkpoints after the initial one over {cfg.epochs} "
        f"epochs, {mb(written / max(len(later), 1))} new on disk each, each holding {mb(logical)} of state); store folder {mb(disk)} in all; raw state "
        f"{mb(raw['total'])} (model {mb(raw['model'])}, optimizer {mb(raw['optimizer'])}); changed per epoch "
        f"{mb(changed)} ({changed / raw['total']:.1%} of the raw state)",
        {"checkpoints": ck.drop(columns=[c for c in ("path",) if c in ck]).to_dict("records"), "disk": disk,
         "raw": raw, "changed": changed, "written_per_epoch": per_epoch},
    )


def measure(ctx: Ctx) -> list[Row]:
    from record_overhead import record_once

    cfg = ctx.cfg
    rows = []
    # the main run (recorded by measurement 1, in a store of its own)
    rows.append(one(ctx, cfg, ctx.run, ctx.store, f"full training ({cfg.epochs} epochs)", "6"))
    ft = replace(cfg, freeze=True, epochs=min(cfg.epochs, 6))
    _, run, store, _ = record_once(ctx, ft, name="finetune")
    rows.append(one(ctx, ft, run, store, f"frozen-backbone fine-tune ({ft.epochs} epochs)", "6"))
    return rows


def main(argv=None):
    p = add_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    a = p.parse_args(argv)
    run_measurement(a, measure)


if __name__ == "__main__":
    main()
