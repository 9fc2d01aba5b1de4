"""Replay and probe bookkeeping in the store: the ``replays`` table and ``probes/NAME@VERSION.json``."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import disk
from .errors import StoreError
from .machine import alive
from .store_db import _guard

if TYPE_CHECKING:
    from .store import Run


class ReplayRows:
    """The replay and probe methods of a :class:`~flor_nb.store.Store` (a mixin: needs its ``db``, ``_tx``
    and ``home``)."""

    @_guard
    def create_replay(self, run_id, code, cells, epochs, plan) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO replays (run_id, code, cells, epochs, started, status, plan, owner) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, code, json.dumps(cells), json.dumps(epochs), time.time(), "running", json.dumps(plan),
                 f"{platform.node()}:{os.getpid()}"),
            )
            return cur.lastrowid

    @_guard
    def set_replay_plan(self, replay_id, plan):
        with self._tx() as db:
            db.execute("UPDATE replays SET plan=? WHERE id=?", (json.dumps(plan), replay_id))

    @_guard
    def finish_replay(self, replay_id, status, duration, probes, fidelity):
        with self._tx() as db:
            db.execute(
                "UPDATE replays SET status=?, duration=?, probes=?, fidelity=? WHERE id=?",
                (status, duration, json.dumps(probes), json.dumps(fidelity), replay_id),
            )

    @_guard
    def replays(self, run_id) -> list[dict]:
        """A run's replays; one left 'running' by a process that died is marked 'interrupted'."""
        rows = self.db.execute("SELECT * FROM replays WHERE run_id=? ORDER BY id", (run_id,)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            for key in ("cells", "epochs", "probes", "fidelity", "plan"):
                d[key] = json.loads(d[key])
            host, _, pid = (d.get("owner") or "").rpartition(":")
            if d["status"] == "running" and host == platform.node() and pid.isdigit() and not alive(int(pid)):
                d["status"] = "interrupted"
                d["fidelity"] = {"error": "the process running the replay died"}
                try:
                    self.finish_replay(d["id"], d["status"], d["duration"], d["probes"], d["fidelity"])
                except StoreError:
                    pass
            out.append(d)
        return out

    def probes_path(self, run: Run) -> Path:
        return self.home / "probes" / f"{run.name}@{run.version}.json"

    def save_probes(self, run: Run, probes: list[dict]) -> Path:
        """Remember a run's probes (``probes/NAME@VERSION.json``, written atomically)."""
        path = self.probes_path(run)
        disk.write_atomic(path, json.dumps({"run": run.label, "probes": list(probes)}, indent=1).encode())
        return path

    def load_probes(self, run: Run) -> list[dict] | None:
        """The probes remembered for ``run`` as dicts; None if none were ever saved for it."""
        path = self.probes_path(run)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return []
        return list(data.get("probes", []))
