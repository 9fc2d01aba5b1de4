"""What a recording's checkpoints leave out (see liveness.py) and how often one keeps everything; and what a
step-exit checkpoint keeps of a helper's own variables (:meth:`Omission.carry`)."""
from __future__ import annotations

import logging
import math
import pickle

from . import liveness, runtime, state
from .errors import StoreError

logger = logging.getLogger(__name__)

# An epoch loop's checkpoints that leave values out keep everything every k-th, k at least this and at most the
# next: a probe that reads what they left out before the epoch recomputes it replays from at most k checkpoints
# back. Within those bounds k is the least that keeps the mean checkpoint within _WHOLE_SHARE of the checkpoints
# that leave them out (Adam, Adadelta: the gradients are a third of their state, k = 5; SGD with momentum, a half,
# k = 7, or 8 with the last batch).
_WHOLE_EVERY = (4, 16)
_WHOLE_SHARE = 0.08
# A helper's variables kept with its step loop's exit state (Omission.carry) up to this many pickled bytes; an epoch
# whose variables are bigger, or cannot be pickled, runs its step loop in a replay.
_CARRY_BYTES = 4 << 20


def _kept(value):
    """``value`` as a helper's variable is kept (tensors detached), or ValueError: only plain values (numbers, strings,
    tensors that are not parameters, arrays, and lists, tuples and dicts of them). A module, an optimizer or any
    other object may also be reachable from the namespace, and a copy would not be that object in a replay."""
    import numpy as np
    import torch

    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, np.ndarray, np.generic)):
        return value
    if isinstance(value, torch.Tensor):
        if isinstance(value, torch.nn.Parameter) or (value.is_leaf and value.requires_grad):
            raise ValueError("a parameter")
        return value.detach()
    if type(value) in (list, tuple):
        return type(value)(_kept(v) for v in value)
    if type(value) is dict:
        return {k: _kept(v) for k, v in value.items()}
    raise ValueError(f"a {type(value).__name__}, not a plain value")


def whole_every(kept: int, omitted: int) -> int:
    """How often a checkpoint that could leave ``omitted`` bytes out of ``kept`` keeps them (see _WHOLE_EVERY)."""
    low, high = _WHOLE_EVERY
    return max(low, min(high, math.ceil(omitted / max(1, _WHOLE_SHARE * kept))))


class Omission:
    """The left-out half of :class:`~flor_nb.recorder.Recorder` (which holds the attributes used here)."""

    def _dead_at(self, k, step_exit=False):
        """What unit k's checkpoint may leave out (see liveness.py): only between two units of a loop of known
        length, never after the last unit (the code after the loop reads it). With a step loop, the gradients it
        clears first and the last batch's variables, at its exit (``step_exit``) and at the unit's end, but every
        ``whole_every``-th checkpoint.

        The calls are judged with the namespace once the first unit has bound the body's names; at the first step
        exit a call the epoch's tail has not bound yet counts as reading them, so only a "dead" answer is kept."""
        if self.liveness_input is None or self._total is None or k >= self._total - 1 or self.resume_at is not None:
            return None
        if self._dead is None:
            code, choice, sources = self.liveness_input
            try:
                dead = liveness.for_record(code, choice, sources, self.ns)
            except Exception as e:  # noqa: BLE001 - an optimisation: store everything instead
                logger.info("flor_nb: liveness analysis failed (%s); checkpoints keep every value", e)
                dead = liveness.Dead()
            if step_exit and not dead:
                return None  # judged again at the unit's end
            self._dead = dead
            if self._dead:  # kept with the run now: a replay of a run killed later must know it too
                self.run.state = {**self.run.state, "dead": self._dead.to_json()}
                try:
                    self.store.update_run(self.run.id, state=self.run.state)
                except StoreError:
                    self.liveness_input, self._dead = None, liveness.Dead()  # unknown to replay: omit nothing
        if not self._dead or self._dead.steps != bool(self._step_exits):
            return None
        if self._dead.steps:  # every whole_every-th checkpoint keeps everything (the start one always does)
            at, kept = self._whole
            if at == k or (len(self.omitting) + kept) % self.whole_every == self.whole_every - 1:
                self._whole = (k, kept)  # counted in _end_epoch once its checkpoint is taken
                return None
        return self._dead

    def _note_omitted(self, k, end_snap, step_snap):
        """Keep which checkpoints of unit k left values out (the run's ``omitting`` and ``omitting_steps``); the
        first sets ``whole_every`` from what it left out against the modules' and optimizers' state (what changes
        every epoch)."""
        if end_snap is not None and end_snap[0]["python"].get("omitted"):
            if not self.omitting:
                tensors = end_snap[0]["tensors"]
                trained = {key: t for key, t in tensors.items() if key.startswith("obj/")} or tensors
                self.whole_every = whole_every(state.tensor_bytes(trained), end_snap[0].get("omitted_bytes", 0))
            self.omitting.append(k)
        elif end_snap is not None and self._whole[0] == k:
            self._whole = (k, self._whole[1] + 1)
        if step_snap is not None and step_snap[0]["python"].get("omitted"):
            self.omitting_steps.append(k)

    def carry(self, names, local: dict) -> dict:
        """A helper's variables that its code after the step loop reads (``runtime.carry``): kept with this epoch's
        step-exit state, so a replay that skips the loop gives them back; an epoch where they cannot be kept is
        listed (``uncarried``) and runs its step loop in a replay: one whose variables are not plain values
        (:func:`_kept`) or pickle to more than ``_CARRY_BYTES``."""
        values = runtime.bound_names(names, local)
        snap = self._step_snap if self._step_exits == 1 else None
        if snap is not None:
            try:
                blob = pickle.dumps(_kept(values), protocol=pickle.HIGHEST_PROTOCOL)
                if len(blob) > _CARRY_BYTES:
                    raise ValueError(f"{len(blob)} bytes pickled, over {_CARRY_BYTES}")
            except Exception as e:  # noqa: BLE001 - then this epoch's replay runs its step loop
                logger.info("flor_nb: %s not kept at epoch %s: %s", ", ".join(names), self.epoch, e)
                self.uncarried.append(self.epoch)
            else:
                snap[0]["python"]["carry"] = blob
        return values
