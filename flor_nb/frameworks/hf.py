"""HF transformers ``Trainer``: record ``trainer.train()`` epoch by epoch, replay chosen epochs.

Record: a ``TrainerCallback`` (first in the Trainer's callbacks for the call) drives the units
(``on_epoch_begin`` ends the previous epoch and begins the next, ``on_train_end`` ends the last),
keys ``flor.log`` values by the update step within the epoch (``on_step_begin``), and records what
the Trainer logs (``on_log``) as metrics named the way HF's W&B integration names them:
``train/loss``, ``train/learning_rate``, ``train/grad_norm``, ``eval/loss``. Runtimes and throughputs
are wall-clock values: recorded, not compared.

Replay of epochs ``first..last``: the Trainer is rebuilt by the recorded cells; when ``first > 0``
it resumes through its public API, ``train(resume_from_checkpoint=DIR)``, where DIR holds the
recorded ``trainer_state.json`` of that epoch's start (so its loop starts at epoch ``first`` and
its sampler is set to that epoch) and an empty weights file (the weights, optimizer, scheduler,
scaler, RNGs and the Trainer's counters come from flor_nb's checkpoint, restored in
``on_epoch_begin`` of epoch ``first``, the same hook where the recording took it). Where the Trainer's
``output_dir`` already holds files (the recording's checkpoints), the replay's Trainer saves into a new
folder inside it for the call: HF's rotation (``save_total_limit``) removes the oldest checkpoints of its
output folder, and the recording's are not the replay's to remove.

Captured for a Trainer (see :func:`state_dict`, :func:`children`): ``trainer.state`` (global step,
epoch, log history without wall-clock values, best metric, ...), ``trainer.control``, the loss
accumulators and step counters of the training loop, the CUDA RNGs when CUDA is in use, attributes
of a Trainer subclass, and callbacks that are not HF's own stateless ones; the model, optimizer,
LR scheduler and grad scaler are captured on their own. Arguments, datasets, the data collator,
tokenizer and accelerator are rebuilt by the recorded cells.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import types
import weakref
from pathlib import Path

import torch

from . import units as _units

# The training loop's own counters and accumulators (Trainer attributes), restored with the state:
# the logged loss is an average since the last log; the final train_loss, an average since train() began.
_COUNTERS = ("_tr_loss", "_total_loss_scalar", "_globalstep_last_logged", "_initial_global_step",
             "_initial_num_input_tokens_seen", "current_flos", "current_gradient_accumulation_steps")
_STATE_SKIP = ("stateful_callbacks",)  # callbacks are captured as callbacks


def is_clock(name: str) -> bool:
    """Runtimes, throughputs and memory deltas: different in every run."""
    return name.endswith(("_runtime", "_per_second")) or "_mem_" in name


def metric_name(key: str) -> str:
    """``loss`` -> ``train/loss``, ``eval_loss`` -> ``eval/loss`` (HF's own W&B naming)."""
    for split in ("eval", "test"):
        if key.startswith(split + "_"):
            return f"{split}/{key[len(split) + 1:]}"
    return f"train/{key}"


# -- capture -------------------------------------------------------------------------------------
_own_names: set | None = None


def _framework_names() -> set:
    """Attribute names HF's Trainer code assigns (``self.x = ...``): other attributes of a Trainer belong to
    a user's subclass (``self.kd_loss``). Assignments, not every name its code mentions: ``self.loss`` is a user's."""
    global _own_names
    if _own_names is None:
        import dis

        from transformers import Trainer

        names = set()
        for klass in Trainer.__mro__:
            for member in vars(klass).values():
                fn = getattr(member, "__func__", member)
                fn = getattr(fn, "fget", fn)
                if isinstance(fn, types.FunctionType):
                    stack = [fn.__code__]
                    while stack:
                        code = stack.pop()
                        names.update(i.argval for i in dis.get_instructions(code) if i.opname == "STORE_ATTR")
                        stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
        _own_names = names
    return _own_names


def user_attrs(trainer) -> dict:
    if type(trainer).__module__.startswith("transformers."):
        return {}
    own = _framework_names()
    return {k: v for k, v in sorted(vars(trainer).items()) if k not in own}


def _callbacks(trainer):
    """(index, callback) of callbacks with state of their own: not flor_nb's, not HF's stateless
    defaults (progress bars, printers, the default flow), which only report."""
    from transformers.trainer_callback import ExportableState

    out = []
    for i, cb in enumerate(trainer.callback_handler.callbacks):
        if getattr(cb, "_flor", False):
            continue
        if type(cb).__module__.startswith("transformers.") and not isinstance(cb, ExportableState):
            continue
        out.append((i, cb))
    return out


def state_dict(trainer, paths: bool = True) -> dict:
    st = trainer.state
    state = {f.name: getattr(st, f.name) for f in dataclasses.fields(st) if f.name not in _STATE_SKIP}
    state["log_history"] = [{k: v for k, v in entry.items() if not is_clock(k)} for entry in st.log_history]
    out = {
        "framework": "transformers",
        "state": state,
        "control": dataclasses.asdict(trainer.control),
        "counters": {k: getattr(trainer, k) for k in _COUNTERS if hasattr(trainer, k)},
    }
    if paths:
        out["relative_paths"] = True  # best_model_checkpoint is named within the output folder
        state["best_model_checkpoint"] = _relative(trainer, st.best_model_checkpoint)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_rng"] = torch.cuda.get_rng_state_all()
    return out


_RECORDED_OUTPUT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # trainer -> its output folder, in a replay


def _outputs(trainer) -> list:
    """The Trainer's output folder, then the recording's where a replay saves elsewhere (:func:`replay`)."""
    return [p for p in (trainer.args.output_dir, _RECORDED_OUTPUT.get(trainer)) if p]


def _relative(trainer, path):
    """A checkpoint folder named within the output folder: the replay's output folder is not the recording's."""
    for base in _outputs(trainer) if path else ():
        rel = os.path.relpath(path, base)
        if not rel.startswith(".."):
            return rel
    return path


def _absolute(trainer, rel):
    """:func:`_relative` undone: in the output folder that holds it (the replay's own, else the recording's)."""
    if not rel or os.path.isabs(rel):
        return rel
    places = [os.path.join(base, rel) for base in _outputs(trainer)]
    return next((p for p in places if os.path.exists(p)), places[0] if places else rel)


def load_state_dict(trainer, tree: dict):
    st = trainer.state
    for k, v in tree["state"].items():
        if k == "log_history":
            st.log_history[:] = [dict(e) for e in v]
        elif k == "best_model_checkpoint" and tree.get("relative_paths"):
            st.best_model_checkpoint = _absolute(trainer, v)
        else:
            setattr(st, k, v)
    for k, v in tree["control"].items():
        setattr(trainer.control, k, v)
    for k, v in tree["counters"].items():
        live = getattr(trainer, k, None)
        if isinstance(v, torch.Tensor) and isinstance(live, torch.Tensor) and live.shape == v.shape:
            with torch.no_grad():
                live.copy_(v.to(live.device))  # in place: the training loop holds this tensor
        else:
            setattr(trainer, k, v)
    if "cuda_rng" in tree and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tree["cuda_rng"])


def children(trainer) -> list:
    out = [(".model", trainer.model, "walk")]
    for name in ("optimizer", "lr_scheduler"):
        if getattr(trainer, name, None) is not None:
            out.append((f".{name}", getattr(trainer, name), "walk"))
    scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
    if scaler is not None:
        out.append((".accelerator.scaler", scaler, "walk"))
    out.extend((f".callback_handler.callbacks[{i}]", cb, "attrs") for i, cb in _callbacks(trainer))
    return out


# -- record and replay ---------------------------------------------------------------------------
def _callback(units, session):
    from transformers import TrainerCallback

    class FlorCallback(TrainerCallback):
        """flor_nb's callback: epoch boundaries, steps, and what the Trainer logs."""

        _flor = True

        def __init__(self):
            self.i = 0

        def on_epoch_begin(self, args, state, control, **kwargs):
            units.epoch_begin(state.num_train_epochs)
            self.i = 0

        def on_step_begin(self, args, state, control, **kwargs):
            units.step(self.i)
            self.i += 1

        def on_epoch_end(self, args, state, control, **kwargs):
            units.step(None)  # what follows (evaluation, epoch-level logs) is the epoch's, not a step's

        def on_log(self, args, state, control, logs=None, **kwargs):
            for key, value in (logs or {}).items():
                if key == "epoch" or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                name = metric_name(key)
                if is_clock(key) and hasattr(session, "clock"):  # the recorder: listed as not compared
                    session.clock[1].add(name)
                session.log(name, value)

        def on_train_end(self, args, state, control, **kwargs):
            units.train_end()

    return FlorCallback()


def record(rec, trainer, method, args, kwargs):
    units = _units.RecordUnits(rec)
    cb = _callback(units, rec)
    trainer.callback_handler.callbacks.insert(0, cb)  # first: a user's probe callback sees the new epoch, step
    return units.run(lambda: getattr(trainer, method)(*args, **kwargs), lambda: trainer.remove_callback(cb))


def _trainer_tree(snap: dict, trainer, ns) -> dict | None:
    """The recorded state of ``trainer`` in a checkpoint (found by its path in the namespace)."""
    from ..paths import resolve

    for key, tree in snap["tensors"].items():
        if key.startswith("obj/") and isinstance(tree, dict) and tree.get("framework") == "transformers":
            try:
                if resolve(ns, key[4:]) is trainer:
                    return tree
            except LookupError:
                continue
    return None


def _resume_dir(rep, trainer, snap) -> str | None:
    """A checkpoint folder HF resumes from at the recorded epoch: its ``trainer_state.json`` and an
    empty weights file (the real state comes from flor_nb's checkpoint in ``on_epoch_begin``)."""
    from transformers import TrainerState
    from transformers.trainer_callback import ExportableState

    tree = _trainer_tree(snap, trainer, rep.ns)
    if tree is None:
        from . import FrameworkError

        raise FrameworkError("The checkpoint of this run holds no state of the Trainer the replayed cell trains, "
                             f"so replay cannot start at epoch {rep.first}. Keep the Trainer in a variable of the "
                             "recorded cells (trainer = Trainer(...)) and record again.")
    # As the Trainer makes it: its stateful callbacks are registered (it saves their state in checkpoints).
    state = TrainerState(stateful_callbacks=[cb for cb in trainer.callback_handler.callbacks + [trainer.control]
                                             if isinstance(cb, ExportableState)])
    for k, v in tree["state"].items():
        if hasattr(state, k):
            setattr(state, k, v)
    folder = Path(rep.home) / "tmp" / f"hf-resume-{os.getpid()}-{rep.first}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    state.save_to_json(str(folder / "trainer_state.json"))
    from safetensors.torch import save_file

    save_file({}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return str(folder)


def replay(rep, trainer, method, args, kwargs):
    snap = rep.entry_snapshot()
    units = _units.ReplayUnits(rep, snap)
    folder = None
    # The weights file is empty on purpose: HF's warning that weights are missing is silenced for the call.
    log = logging.getLogger("transformers.trainer")
    level = log.level
    if rep.first > 0 and snap is not None:
        folder = _resume_dir(rep, trainer, snap)
        args = args[1:] if args else args  # the first positional argument is resume_from_checkpoint
        kwargs = {**kwargs, "resume_from_checkpoint": folder}
        log.setLevel(logging.ERROR)
    cb = _callback(units, rep)
    trainer.callback_handler.callbacks.insert(0, cb)  # first: a user's probe callback sees the new epoch, step
    output = trainer.args.output_dir
    if (rep.capturer.limits if rep.capturer else {}).get("framework_paths"):  # else recorded before it: as then
        from . import replay_folder

        trainer.args.output_dir = replay_folder(output, "Trainer")
        if trainer.args.output_dir != output:
            _RECORDED_OUTPUT[trainer] = output
    try:
        getattr(trainer, method)(*args, **kwargs)
    finally:
        trainer.remove_callback(cb)
        trainer.args.output_dir = output
        _RECORDED_OUTPUT.pop(trainer, None)
        log.setLevel(level)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    units.train_end()
    units.done()
