"""The bytes of a tensor (without a copy where possible) and a content hash of a tensor or array."""
from __future__ import annotations

import numpy as np
import torch

from .hashing import hash_bytes


def _raw(t) -> memoryview | bytes:
    """The bytes of a tensor, without a copy where it is contiguous on the CPU."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.numel():
        return b""
    if t.is_contiguous() and t.dtype in _NUMPY_DTYPES:  # the fast path: ~3x fewer tensor ops
        return memoryview(t.numpy()).cast("B")
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().data


_NUMPY_DTYPES = {torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
                 torch.uint8, torch.bool, torch.complex64, torch.complex128}


def content_hash(value) -> str:
    """Hash of a tensor's or array's bytes (with dtype and shape)."""
    if isinstance(value, np.ndarray):
        head, raw = f"{value.dtype}{value.shape}", np.ascontiguousarray(value).reshape(-1).view(np.uint8).data
    else:
        head, raw = f"{value.dtype}{tuple(value.shape)}", _raw(value)
    return hash_bytes(head.encode() + bytes(raw))
