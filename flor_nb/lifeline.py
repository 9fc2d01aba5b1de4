"""A replay worker exits when the process that owns its pool dies.

Workers are forked by a forkserver, not by the kernel, so they outlive a killed
kernel (measured: 14-18 minutes, ~250 MB each) unless they watch it. A daemon
thread waits on a pidfd of the owner (Linux 5.3+: no polling, immune to pid
reuse) or, elsewhere, polls it once a second, and ends the worker when it is gone.
"""
from __future__ import annotations

import os
import select
import threading
import time

from .machine import alive


def watch(owner: int) -> None:
    """Exit this process as soon as process ``owner`` exits."""
    try:
        fd = os.pidfd_open(owner)
    except (AttributeError, OSError):
        fd = None
        if not alive(owner):
            os._exit(0)
    threading.Thread(target=_wait, args=(owner, fd), name="flor_nb-lifeline", daemon=True).start()


def _wait(owner: int, fd) -> None:
    if fd is not None:
        select.select([fd], [], [])  # readable once the owner has exited
    else:
        while alive(owner):
            time.sleep(1.0)
    os._exit(0)  # nothing to save: the replay's results had nowhere to go

