"""A framework's epoch hooks, turned into a session's units.

An epoch of a framework ends where the next one begins: after its last step come the
evaluation, logging and checkpoint saving the framework does at the epoch end (HF runs them after
``on_epoch_end``; Lightning updates its epoch metrics after ``on_train_epoch_end``). So unit ``k``
ends at the hook that begins epoch ``k + 1`` (``on_epoch_begin`` / ``on_train_epoch_start``),
or at the end of training for the last one, and the checkpoint "after epoch k" is the state at the
start of epoch ``k + 1``: what a replay of that epoch restores, in the same hook.
"""
from __future__ import annotations

import math


class RecordUnits:
    """Drives a :class:`~flor_nb.recorder.Recorder` from a framework's hooks."""

    def __init__(self, recorder):
        self.rec = recorder
        self.k = None
        self.closed = False

    def epoch_begin(self, total=None):
        rec = self.rec
        if self.k is None:
            total = int(math.ceil(total)) if isinstance(total, (int, float)) and total > 0 else None
            rec.open_loop(total)
            self.k = 0
        else:
            rec.end_unit(self.k)
            self.k += 1
        rec.begin_unit(self.k)

    def step(self, i):
        self.rec.step = i

    def train_end(self):
        if self.k is not None and not self.closed:
            self.closed = True
            self.rec.end_unit(self.k)
            self.rec.close_loop()

    def run(self, call, detach):
        """Run the framework's training ``call`` with our callback attached; ``detach`` removes it."""
        try:
            out = call()
        except BaseException:
            self.failed()
            raise
        finally:
            detach()
        self.train_end()
        return out

    def failed(self):
        """The framework's call raised (or was interrupted) inside unit k."""
        if self.k is not None and not self.closed:
            self.closed = True
            self.rec.leave_unit(self.k)
            self.rec.epoch = None


class ReplayUnits:
    """Drives a :class:`~flor_nb.replayer.Replayer`: restore at the first unit, verify at each unit's
    end, stop after the segment's last unit (``_ReplayDone`` out of the framework's call)."""

    def __init__(self, replayer, snap=None, on_enter=None):
        self.rep = replayer
        self.snap = snap  # the checkpoint restored at the first unit (read already, or None: read then)
        self.on_enter = on_enter  # called after the restore (a framework re-applies what depends on it)
        self.k = None

    def epoch_begin(self, total=None):
        rep = self.rep
        if self.k is None:
            self.k = rep.first
            rep.begin_unit(self.k, self.snap)
            self.snap = None
            if self.on_enter is not None:
                self.on_enter()
        else:
            rep.end_unit(self.k)  # raises _ReplayDone after the segment's last unit
            self.k += 1
            rep.begin_unit(self.k)

    def step(self, i):
        self.rep.step = self.rep.last_step = i

    def train_end(self):
        if self.k is not None:
            k, self.k = self.k, None
            self.rep.end_unit(k, stop=False)

    def done(self):
        """After the framework's call returned: the cell's code after it is not replayed."""
        self.rep.finish_units()
