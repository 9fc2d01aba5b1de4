"""What this process may use of the machine: CPUs (affinity and cgroup quota), and out-of-memory kills.

``os.cpu_count()`` counts the host's CPUs; a container or a ``taskset`` gives a
process fewer. Replay sizes its worker pool and its threads from what is usable.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP = Path("/sys/fs/cgroup")


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def cpu_quota() -> float | None:
    """The cgroup CPU limit in CPUs (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), None when unlimited."""
    limits = []
    for folder in _cgroup_dirs("cpu"):
        try:
            text = (folder / "cpu.max").read_text().split()
            if text and text[0] != "max":
                limits.append(int(text[0]) / int(text[1]))
            continue
        except (OSError, ValueError, IndexError):
            pass
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
            if quota > 0 and period > 0:
                limits.append(quota / period)
        except (OSError, ValueError):
            pass
    return min(limits) if limits else None


def alive(pid: int) -> bool:
    """Is process ``pid`` running (on this machine)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: alive
        return True
    return True


def oom_kills() -> int | None:
    """How many processes the out-of-memory killer has killed in this process's cgroup (None: unknown)."""
    for folder in _cgroup_dirs("memory"):
        for name in ("memory.events", "memory.oom_control"):
            try:
                for line in (folder / name).read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
            except (OSError, ValueError):
                continue
    return None


def _cgroup_dirs(controller: str) -> list[Path]:
    """This process's cgroup folders for ``controller`` and their ancestors (limits there apply too)."""
    out = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, path = line.split(":", 2)
        names = controllers.split(",") if controllers else []
        if controllers == "":  # cgroup v2
            bases = [_CGROUP, _CGROUP / "unified"]
        elif controller in names:
            bases = [_CGROUP / controllers, _CGROUP / controller]
        else:
            continue
        for base in bases:
            if not base.is_dir():
                continue
            node = base / path.lstrip("/")
            while True:
                if node.is_dir():
                    out.append(node)
                if node == base:
                    break
                node = node.parent
            if not (base / path.lstrip("/")).is_dir():
                out.append(base)  # inside a container the path may not exist: the mount is ours
    return list(dict.fromkeys(out))
