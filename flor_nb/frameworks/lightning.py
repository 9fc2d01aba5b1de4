"""Lightning ``Trainer``: record ``trainer.fit(...)`` epoch by epoch, replay chosen epochs.

Record: a ``Callback`` (first in ``trainer.callbacks`` for the call) drives the units
(``on_train_epoch_start`` ends the previous epoch and begins the next, ``on_train_end`` ends the
last), keys ``flor.log`` values by the batch index (``on_train_batch_start``), and records what the
module logs with ``self.log``: the values of ``trainer.callback_metrics`` that a training step set
(at that step), and the epoch-level ones (epoch aggregates, validation metrics) at the epoch's end.

Replay of epochs ``first..last``: ``fit`` runs as recorded; in ``on_train_epoch_start`` of its first
epoch flor_nb restores its checkpoint (model, optimizers, LR schedulers, precision scaler, RNGs, and
the fit loop's progress counters, so the epoch counter, global step and schedulers' progress are those
of epoch ``first``) and sets the training samplers to that epoch; Lightning then creates the epoch's
data iterator from the restored RNG, as it did when recording. After epoch ``last`` it stops.

Captured for a Trainer (see :func:`state_dict`, :func:`children`): the fit loop's progress
(``fit_loop.state_dict()``), ``should_stop``, the CUDA RNGs when CUDA is in use; the callback, logged and
progress-bar metrics key by key (so a probe may ``self.log`` a new one); the LightningModule, optimizers, schedulers, precision scaler and datamodule
on their own; callbacks by their ``state_dict`` where they declare one (``EarlyStopping``), else attribute
by attribute. ``ModelCheckpoint``, loggers, model summaries and progress bars are outputs (where files go, what is shown):
rebuilt by the recorded cells, so a replay writes its own checkpoint files, never the recording's. What a
``ModelCheckpoint`` knows (best and k-th scores, its best k files) is state a probe may read, and decides
which files it saves and removes: it is kept with each file named relative to the callback's folder, checked
like any state, and put back with the names in the replay's folder (:func:`_load_checkpoint_callbacks`).
"""
from __future__ import annotations

import os

import torch

from . import units as _units

_METRICS = ("callback_metrics", "logged_metrics", "progress_bar_metrics")


def _pkg(cls) -> str:
    return "pytorch_lightning" if any((k.__module__ or "").startswith("pytorch_lightning.") for k in cls.__mro__) \
        else "lightning.pytorch"


def _mod(pkg: str, name: str):
    import importlib

    return importlib.import_module(f"{pkg}.{name}")


_OUTPUTS = ("callbacks.model_checkpoint", "callbacks.model_summary", "callbacks.rich_model_summary", "loggers.",
            "callbacks.progress.")


def kind(cls) -> str | None:
    """``"output"``: checkpoint writers, loggers and progress bars (where files go, what is shown: rebuilt,
    not restored); ``"plain"``: a Callback or LightningDataModule that keeps Lightning's empty
    ``state_dict`` (saved by value)."""
    pkg = _pkg(cls)
    if any((k.__module__ or "").startswith(tuple(f"{p}.{o}" for p in (pkg, "lightning.fabric") for o in _OUTPUTS))
           for k in cls.__mro__):
        return "output"
    callback = _mod(pkg, "callbacks.callback").Callback
    datamodule = _mod(pkg, "core.datamodule").LightningDataModule
    for base in (callback, datamodule):
        if issubclass(cls, base) and getattr(cls, "state_dict", None) is getattr(base, "state_dict"):
            return "plain"
    return None


def module_internal(cls) -> frozenset:
    """What ``LightningModule.__init__`` sets: Lightning's bookkeeping, not the user's attributes."""
    base = _mod(_pkg(cls), "core.module").LightningModule
    if not issubclass(cls, base):
        return frozenset()
    return frozenset(vars(base())) | {"_trainer", "_hparams", "_hparams_initial", "_hparams_name"}


_CKPT_PATHS = ("best_model_path", "kth_best_model_path", "last_model_path")


# -- capture -------------------------------------------------------------------------------------
def state_dict(trainer, paths: bool = True) -> dict:
    out = {
        "framework": "lightning",
        "fit_loop": trainer.fit_loop.state_dict(),
        "should_stop": bool(trainer.should_stop),
    }
    if paths:
        out["checkpoint_callbacks"] = [_checkpoint_state(cb) for cb in _model_checkpoints(trainer)]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_rng"] = torch.cuda.get_rng_state_all()
    return out


def _model_checkpoints(trainer) -> list:
    cls = _mod(_pkg(type(trainer)), "callbacks.model_checkpoint").ModelCheckpoint
    return [cb for cb in trainer.callbacks if isinstance(cb, cls)]


def _checkpoint_state(cb) -> dict:
    """A ModelCheckpoint's ``state_dict`` without its folder: files are named relative to it (a replay's
    folder is another one: a logger's new version)."""
    sd = dict(cb.state_dict())
    folder = sd.pop("dirpath", None)

    def rel(p):
        return os.path.relpath(p, folder) if p and folder else p
    sd["best_k_models"] = {rel(p): v for p, v in sd.get("best_k_models", {}).items()}
    for key in _CKPT_PATHS:
        sd[key] = rel(sd.get(key))
    return sd


def _load_checkpoint_callbacks(trainer, states: list):
    """Put each ModelCheckpoint's recorded knowledge back, its files named in the replay's folder. Where that
    folder already holds files (a ``dirpath`` the recording also wrote to), the replay's callback writes into a
    new folder inside it instead, so it never overwrites or removes a file of the recording's."""
    from . import replay_folder

    for cb, sd in zip(_model_checkpoints(trainer), states):
        cb.dirpath = folder = replay_folder(cb.dirpath, "ModelCheckpoint")

        def absolute(p):
            return os.path.join(folder, p) if p and folder else p
        full = dict(sd, dirpath=folder, best_k_models={absolute(p): v for p, v in sd["best_k_models"].items()})
        full.update({key: absolute(sd[key]) for key in _CKPT_PATHS})
        cb.load_state_dict(full)


def _load_loop(loop, sd: dict, loop_cls, progress_cls, prefix: str = ""):
    """The loops' progress counters, as ``_Loop.load_state_dict`` loads them, without marking the
    loops as restarting: the state is that of an epoch start reached by training, not a resumed run."""
    for k, v in vars(loop).items():
        key = prefix + k
        if isinstance(v, progress_cls) and key in sd:
            v.load_state_dict(sd[key])
        elif isinstance(v, loop_cls):
            _load_loop(v, sd, loop_cls, progress_cls, key + ".")
    if prefix + "state_dict" in sd:
        loop.on_load_checkpoint(sd[prefix + "state_dict"])


def load_state_dict(trainer, tree: dict):
    pkg = _pkg(type(trainer))
    _load_loop(trainer.fit_loop, tree["fit_loop"], _mod(pkg, "loops.loop")._Loop,
               _mod(pkg, "loops.progress")._BaseProgress)
    trainer.should_stop = tree["should_stop"]
    if "checkpoint_callbacks" in tree:  # runs recorded before it was kept have none
        _load_checkpoint_callbacks(trainer, tree["checkpoint_callbacks"])
    if "cuda_rng" in tree and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tree["cuda_rng"])


def user_attrs(trainer) -> dict:
    return {}  # a Lightning Trainer is configured, not subclassed: the module holds the user's state


def children(trainer) -> list:
    out = []
    if trainer.lightning_module is not None:
        out.append((".lightning_module", trainer.lightning_module, "walk"))
    out.extend((f".optimizers[{i}]", opt, "walk") for i, opt in enumerate(trainer.optimizers))
    out.extend((f".lr_scheduler_configs[{i}].scheduler", c.scheduler, "walk")
               for i, c in enumerate(trainer.lr_scheduler_configs))
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None:
        out.append((".precision_plugin.scaler", scaler, "walk"))
    if trainer.datamodule is not None:
        out.append((".datamodule", trainer.datamodule, "walk"))
    for i, cb in enumerate(trainer.callbacks):
        if not getattr(cb, "_flor", False) and kind(type(cb)) != "output":
            # declared state: its state_dict; else attribute by attribute
            out.append((f".callbacks[{i}]", cb, "attrs" if kind(type(cb)) == "plain" else "walk"))
    # The metrics the module logged, key by key: a probe's own self.log adds a key, which is new, not a change.
    out.extend((f".{name}", getattr(trainer, name), "keys") for name in _METRICS)
    return out


# -- record and replay ---------------------------------------------------------------------------
def _numbers(metrics: dict, seen: dict) -> list:
    """(name, value) of metrics set since ``seen`` was taken (Lightning makes new tensors when it updates)."""
    out = []
    for name, value in metrics.items():
        if seen.get(name) is value:
            continue
        seen[name] = value
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out.append((name, value.item()))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((name, value))
    return out


def _callback(trainer, units, session):
    base = _mod(_pkg(type(trainer)), "callbacks.callback").Callback

    class FlorCallback(base):
        """flor_nb's callback: epoch boundaries, batches, and what the module logs."""

        _flor = True

        def __init__(self):
            self.seen: dict = {}

        def _log_new(self, trainer):
            for name, value in _numbers(trainer.callback_metrics, self.seen):
                session.log(name, value)

        def on_train_epoch_start(self, trainer, pl_module):
            if units.k is not None:  # the epoch-level metrics of the epoch that ended
                session.step = None
                self._log_new(trainer)
            units.epoch_begin(trainer.max_epochs)
            self.seen = dict(trainer.callback_metrics)  # after a restore: the restored values are not new

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            units.step(batch_idx)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._log_new(trainer)

        def on_validation_start(self, trainer, pl_module):
            units.step(None)  # validation belongs to the epoch, not to a step

        def on_train_epoch_end(self, trainer, pl_module):
            units.step(None)

        def on_train_end(self, trainer, pl_module):
            if units.k is not None:
                session.step = None
                self._log_new(trainer)
            units.train_end()

    return FlorCallback()


def _set_epoch(trainer):
    """Samplers that shuffle by epoch (``set_epoch``) get the restored epoch, as Lightning does at an epoch start."""
    loaders = trainer.train_dataloader
    stack = [loaders]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, torch.utils.data.DataLoader):
            for s in (x.sampler, getattr(x.batch_sampler, "sampler", None), x.batch_sampler):
                if s is not None and hasattr(s, "set_epoch"):
                    s.set_epoch(trainer.current_epoch)


def record(rec, trainer, method, args, kwargs):
    units = _units.RecordUnits(rec)
    cb = _callback(trainer, units, rec)
    trainer.callbacks.insert(0, cb)  # first: a user's probe callback sees the new epoch and batch

    def detach():
        if cb in trainer.callbacks:
            trainer.callbacks.remove(cb)
    return units.run(lambda: getattr(trainer, method)(*args, **kwargs), detach)


def replay(rep, trainer, method, args, kwargs):
    units = _units.ReplayUnits(rep, None, on_enter=lambda: _set_epoch(trainer))
    cb = _callback(trainer, units, rep)
    trainer.callbacks.insert(0, cb)  # first: a user's probe callback sees the new epoch and batch
    try:
        getattr(trainer, method)(*args, **kwargs)
    finally:
        if cb in trainer.callbacks:
            trainer.callbacks.remove(cb)
    units.train_end()
    units.done()
