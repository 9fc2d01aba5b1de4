"""The bytes of a tensor (without a copy where possible) and a content hash of a tensor or array."""
from __future__ import annotations

import threading

import numpy as np
import torch

from .hashing import hash_bytes, new_hasher


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


STAGE_BYTES = 32 * 2 ** 20  # the pinned buffer a GPU tensor is hashed through, a piece at a time
STAGED = True  # False: hash GPU tensors through a fresh .cpu() copy, as before (bench/gpu.py compares)
_stage_lock = threading.Lock()
_stage: list = []  # [pinned uint8 buffer], made on first use


def hash_tensor(t: torch.Tensor, algorithm: str) -> str:
    """The hash of a tensor's bytes, equal to ``hash_bytes(_raw(t))``.

    A CUDA tensor is copied into one reused pinned buffer a piece at a time and hashed as it lands,
    instead of through a fresh ``.cpu()`` copy: no host allocation (first-touch page faults cost more
    than the copy) and no second copy of the tensor in host memory.
    """
    if t.device.type != "cuda" or not STAGED or not torch.cuda.is_available():
        return hash_bytes(_raw(t), algorithm)
    src = t.detach()
    if not src.is_contiguous():
        src = src.contiguous()
    flat = src.reshape(-1).view(torch.uint8) if src.numel() else torch.empty(0, dtype=torch.uint8)
    h = new_hasher(algorithm)
    with _stage_lock:
        if not _stage or _stage[0].numel() < STAGE_BYTES:
            _stage[:] = [torch.empty(STAGE_BYTES, dtype=torch.uint8, pin_memory=True)]
        buf = _stage[0]
        with torch.cuda.device(src.device):
            for i in range(0, flat.numel(), STAGE_BYTES):
                piece = flat[i:i + STAGE_BYTES]
                part = buf[:piece.numel()]
                part.copy_(piece)  # synchronous: the bytes have landed when it returns
                h.update(memoryview(part.numpy()))
    return h.hexdigest()
