"""Make the first vectorized math call of a process exact: MKL VML is set up by one thread, alone.

PyTorch's CPU build computes ``sqrt``, ``exp``, ``log``, ``tanh`` and similar ops with MKL's vector math
library (VML), in chunks of 2,048 elements spread over torch's threads. VML picks its code for this CPU on
its first call. When that first call comes from two threads at once, and torch's second thread already
exists (any earlier parallel op made it), the second thread can compute its chunk with approximate code:
about 2^-12 relative error instead of the correctly rounded result. Only that call is affected.

In a replay this broke bit-exactness at random: Adam's ``exp_avg_sq.sqrt()`` on a 64x64 weight (4,096
elements, the first VML call of the worker) came out approximate in its second half in 12 of 60 worker
processes (measured with a forkserver like the replay pool's, after its warm-up op, on this 2-core VM), so
the first replayed epoch diverged by a few ulps and its verdict said "NOT faithful". The recording kernel
can hit the same race at its first such call. One call on a few elements, on one thread, first, sets VML
up: 0 of 60 after it. :func:`settle` makes that call: ``%load_ext flor_nb`` (so the cells a replay re-runs
compute in the kernel as they will in the worker), the recorder, and every replay worker before its cells.
"""
from __future__ import annotations

_settled = False


def settle() -> None:
    """Set up VML with one single-threaded call, once per process (a forked child inherits it)."""
    global _settled
    if _settled:
        return
    import torch

    torch.full((8,), 0.5).sqrt()  # 8 elements: below torch's parallel grain, so one thread makes the call
    _settled = True
