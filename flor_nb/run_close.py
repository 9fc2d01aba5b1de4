"""What a recording stores about itself when it ends: its status, what it captured and left out, and where its
time went (the run's ``state`` and ``timings``)."""
from __future__ import annotations

import time

from . import state


class RunClose:
    """The run-closing half of :class:`~flor_nb.recorder.Recorder` (which holds the attributes used here)."""

    def _close_run(self, status, error, stored, args):
        self.store.update_run(
            self.run.id,
            status=status,
            ended=time.time(),
            epochs_completed=stored,
            args=args,
            error=error,
            state={
                **self.run.state,  # the loops chosen at the start
                "capture": 2,  # reachability capture, fingerprinted variables (flor_nb 0.2)
                "objects": self.objects,
                "not_captured": self.not_captured,
                "notes": self.notes,
                "data": self.data,
                "outputs": self.outputs,
                "roots": self.roots,
                "limits": self.capturer.limits,
                "clock_vars": sorted(self.clock[0]),
                "clock_metrics": sorted(self.clock[1]),
                "clock_attrs": self.capturer.clock_attrs.found(),
                "checkpoint_error": self.checkpoint_error,
                "digest_errors": self.digest_errors,
                "store_budget": None if self.thinner is None else self.thinner.summary(),
                "omitting": self.omitting,
                "omitting_steps": self.omitting_steps,
                **({"uncarried": self.uncarried} if self.uncarried else {}),
                **({"whole_every": self.whole_every} if self.omitting and self._dead and self._dead.steps else {}),
                "loop_range": self.loop_range,
                "spec": spec_of(self.scope),
            },
            timings={
                "epoch_seconds": self.epoch_seconds,
                "units": self.completed,
                "unit_seconds_mean": self.unit_seconds_total / self.completed if self.completed else None,
                "snapshot_seconds": self.snapshot_seconds,
                "digest_seconds": self.digest_seconds,
                "write_seconds": self.write_seconds,
                "writer_seconds": self.writer.busy_seconds,
                "writer_cpu_seconds": self.writer.cpu_seconds,
                "saver": self._saver_summary(),
                "commit_seconds": self.commit_seconds,
                "start_checkpoint_wait": self.start_wait,
                "close_wait": self.close_wait,  # seconds the cell's end waited for the last checkpoints' writes
                "overhead_budget": self.overhead,
            },
        )

    def _saver_summary(self) -> dict:
        """Who wrote the checkpoints: the saver process (how many, its CPU seconds) and, if it went away, why."""
        why = ("FLOR_NB_SAVER=thread, or no memfd/forkserver here" if self.saver is None else
               self.saver.gone or self.pool.shared.pin_failed)
        return {"process": self.saver_writes, "cpu_seconds": self.saver_cpu, "why_not": why}


def spec_of(scope: state.Scope) -> dict:
    """``--state`` as stored with a run."""
    return {"only": sorted(scope.only) if scope.only else None, "extra": sorted(scope.extra)}
