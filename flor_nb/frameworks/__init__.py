"""Training frameworks: a cell that calls ``trainer.train()`` (HF transformers) or ``trainer.fit(...)`` (Lightning).

Such a cell has no loop of its own: the framework runs the epochs. flor_nb rewrites the call into
``__flor__.fit(trainer, "train", ...)`` (see :mod:`.calls`), which attaches a callback through the
framework's public callback API. The callback drives the session's unit API at the framework's epoch
boundaries (:mod:`.units`): recording checkpoints and digests there, replay restores at the first chosen
epoch and stops after the last. What a trainer holds that is training state (progress counters, loss
accumulators, stateful callbacks) is captured through the hooks below, which :mod:`flor_nb.capture` and
:mod:`flor_nb.state` call; models, optimizers, schedulers and scalers the trainer owns are captured
as usual, under the trainer's path (``trainer.optimizer``).

Both frameworks are optional: nothing here imports them unless a trainer of theirs is already in use.
"""
from __future__ import annotations

import importlib
import logging
import os
import tempfile

from ..errors import FlorError

# What each adapter recognizes by the modules of a class's MRO: no framework is imported to check.
_ADAPTERS = {"hf": "flor_nb.frameworks.hf", "lightning": "flor_nb.frameworks.lightning"}
_TRAINERS = {
    ("transformers.trainer", "Trainer"): "hf",
    ("lightning.pytorch.trainer.trainer", "Trainer"): "lightning",
    ("pytorch_lightning.trainer.trainer", "Trainer"): "lightning",
}
METHODS = {"hf": "train", "lightning": "fit"}  # the call that trains
NAMES = {"hf": "HF Trainer", "lightning": "Lightning Trainer"}
# Framework objects that are configuration or data, rebuilt by the recorded cells (never copied):
# training arguments, model configs, tokenizers and processors, data collators, HF datasets.
_REBUILT_MODULES = ("transformers.training_args", "transformers.configuration_utils",
                    "transformers.generation.configuration_utils", "transformers.tokenization_utils_base",
                    "transformers.processing_utils", "transformers.feature_extraction_utils",
                    "transformers.image_processing_base", "transformers.data.data_collator",
                    "datasets.arrow_dataset", "datasets.dataset_dict", "datasets.iterable_dataset",
                    "accelerate.accelerator", "accelerate.state")
_PREFIXES = ("transformers", "lightning", "pytorch_lightning", "datasets", "accelerate")

_kinds: dict = {}  # type -> "framework" | "rebuilt" | "plain" | None


class FrameworkError(FlorError):
    """A framework call cannot be recorded or replayed as written."""


def adapter(name: str):
    return importlib.import_module(_ADAPTERS[name])


def replay_folder(folder, what: str):
    """Where a replay's ``what`` saves checkpoints: ``folder`` itself when it is new or empty, else a new
    ``flor-replay-*`` folder inside it, so the replay never overwrites or removes the recording's files there
    (HF's ``save_total_limit`` rotation, Lightning's top-k bookkeeping)."""
    if not (folder and os.path.isdir(folder) and os.listdir(folder)):
        return folder
    own = tempfile.mkdtemp(prefix="flor-replay-", dir=folder)
    logging.getLogger(__name__).warning("The replay's %s saves to %s: %s holds the recording's files", what, own,
                                        folder)
    return own


def framework_of(obj, is_class: bool = False) -> str | None:
    """``"hf"`` or ``"lightning"`` for a trainer of theirs (subclasses too; ``is_class``: for the class), else None."""
    cls = obj if is_class else type(obj)
    for klass in getattr(cls, "__mro__", ()):
        name = _TRAINERS.get((klass.__module__, klass.__name__))
        if name:
            return name
    return None


def kind(obj) -> str | None:
    """How capture treats ``obj``: ``"framework"`` (a trainer: :func:`state_dict`, :func:`children`),
    ``"rebuilt"`` (configuration, tokenizers, HF datasets: like data), ``"plain"`` (saved by value
    although it has ``state_dict``: a Lightning callback that declares no state), ``"output"`` (Lightning's
    checkpoint writer, loggers, progress bars: where files go and what is shown), or None."""
    t = type(obj)
    try:
        return _kinds[t]
    except KeyError:
        pass
    except TypeError:  # an unhashable type object
        return None
    out = None
    modules = [k.__module__ or "" for k in t.__mro__]
    if any(m.startswith(_PREFIXES) for m in modules):
        if framework_of(obj):
            out = "framework"
        elif any(m in _REBUILT_MODULES for m in modules):
            out = "rebuilt"
        elif any(m.startswith(("lightning.", "pytorch_lightning.")) for m in modules):
            out = adapter("lightning").kind(t)
    _kinds[t] = out
    return out


def state_dict(trainer, paths: bool = True) -> dict:
    """The trainer's own training state (a tree of plain values and tensors; objects as leaves). ``paths``: its
    checkpoint files named relative to their folder (runs recorded before that replay without)."""
    return adapter(framework_of(trainer)).state_dict(trainer, paths)


def load_state_dict(trainer, tree: dict):
    adapter(framework_of(trainer)).load_state_dict(trainer, tree)


def children(trainer) -> list:
    """``[(suffix, object, how)]``: what the trainer owns that is captured on its own (model, optimizers,
    schedulers, scaler, callbacks, metrics); ``trainer`` + suffix is its path. ``how``: ``"walk"`` (as
    any object), ``"attrs"`` (a plain object, a callback: attribute by attribute), ``"keys"`` (a dict of
    metrics: key by key)."""
    return adapter(framework_of(trainer)).children(trainer)


def user_attrs(trainer) -> dict:
    """Attributes a user's subclass of the trainer set (``self.n_calls = 0``): saved by value."""
    return adapter(framework_of(trainer)).user_attrs(trainer)


_internal: dict = {}


# torch.compile's OptimizedModule: the compiled forward and dynamo's context with the graphs it compiled
# (walking them reached FX graphs too deep to pickle, and every variable sharing their unit went with them).
# Its state is its _orig_mod's, walked as a submodule; anything else set on the wrapper is the user's.
_DYNAMO_ATTRS = frozenset({"_super_module_initialized", "_torchdynamo_orig_callable", "_torchdynamo_wrapper_id",
                           "dynamo_ctx", "forward", "_forward", "get_compiler_config"})


def internal_attrs(module_type) -> frozenset:
    """Attributes a module base class sets itself, not the user's state: a LightningModule's ``_trainer``
    and ``_current_fx_name``, torch.compile's wrapper's compiled forward and dynamo context."""
    try:
        return _internal[module_type]
    except KeyError:
        pass
    out = frozenset()
    if module_type.__name__ == "OptimizedModule" and module_type.__module__.startswith("torch._dynamo"):
        out = _DYNAMO_ATTRS
    elif any((k.__module__ or "").startswith(("lightning.", "pytorch_lightning.")) for k in module_type.__mro__):
        out = adapter("lightning").module_internal(module_type)
    _internal[module_type] = out
    return out


def fit(session, trainer, method: str, args: tuple, kwargs: dict):
    """``trainer.<method>(*args, **kwargs)`` run by ``session``: recorded, replayed, or just called."""
    name = framework_of(trainer)
    call = getattr(trainer, method)
    if name is None or method != METHODS[name]:
        return call(*args, **kwargs)
    from ..recorder import Recorder
    from ..worker import Replayer

    if isinstance(session, Recorder):
        return adapter(name).record(session, trainer, method, args, kwargs)
    if isinstance(session, Replayer) and not session.setup:
        return adapter(name).replay(session, trainer, method, args, kwargs)
    return call(*args, **kwargs)
