"""Snapshot buffers in anonymous shared memory, so a saver process reads a snapshot without a copy.

Each buffer is a ``memfd`` (Linux), sized and allocated up front with ``posix_fallocate`` (a full
memory limit fails here, as an error, not later as a SIGBUS inside a copy), and mapped into this
process. Its file descriptor goes to the saver once (:meth:`SharedBuffers.take_new`), which maps the
same pages; nothing has a name, so nothing outlives both processes, even after a SIGKILL.

Buffers outlive a recording: the next recording of the kernel borrows them again (already mapped by the
saver, their pages already touched), up to :data:`KEEP_BYTES` of them; the rest are unmapped.

Buffers for CUDA tensors are page-locked with ``cudaHostRegister`` (as torch's own distributed checkpoint
pins shared memory), so a device-to-host copy into one runs on a side stream without blocking, and the
saver still reads it without a copy. Where registering fails, :attr:`SharedBuffers.pin_failed` says why and
those tensors go to private pinned buffers, written by the kernel's thread as before.
"""
from __future__ import annotations

import logging
import mmap
import os
import threading

import torch

log = logging.getLogger(__name__)

KEEP_BYTES = int(float(os.environ.get("FLOR_NB_SNAPSHOT_KEEP_BYTES", 256 << 20)))  # kept between recordings
# Page-locked buffers (for CUDA tensors) cost a registration each (about 0.4 s per GB), which a recording would
# otherwise pay again at its first checkpoints; torch keeps its own pinned memory for the process's life.
KEEP_PINNED_BYTES = int(float(os.environ.get("FLOR_NB_PINNED_KEEP_BYTES", 2 << 30)))


def available() -> bool:
    """Can buffers be shared this way here (Linux ``memfd_create``)?"""
    return hasattr(os, "memfd_create") and hasattr(os, "posix_fallocate")


class SharedBuffers:
    """Host tensors backed by memfds: ``empty`` makes (or lends again) one; ``ref`` names one for the saver."""

    def __init__(self):
        # data pointer -> (buffer id, bytes, the tensor, page-locked): held, so its memory is never freed while
        # registered and its address never names another tensor (which the saver would read from the old mapping)
        self._by_ptr: dict[int, tuple[int, int, torch.Tensor, bool]] = {}
        self._new: list[tuple[int, int]] = []  # (buffer id, fd) the saver has not been sent yet
        self._free: dict = {}  # (dtype, shape, pinned) -> buffers a finished recording gave back
        self._lock = threading.Lock()
        self._next = 0
        self.failed: str | None = None  # why the last allocation fell back to private memory
        self.pin_failed: str | None = None  # why page-locking a buffer failed (then no buffer is pinned again)

    def empty(self, shape, dtype: torch.dtype, pinned: bool = False) -> torch.Tensor | None:
        """A contiguous CPU tensor in shared memory, page-locked for CUDA copies when ``pinned``, or None (empty
        tensor, no room, or it cannot be page-locked here: the caller allocates)."""
        shape = tuple(shape)
        if pinned and self.pin_failed:
            return None
        with self._lock:
            free = self._free.get((dtype, shape, pinned))
            if free:
                return free.pop()
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if not nbytes:
            return None
        fd = os.memfd_create("flor_nb-snapshot", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
            os.posix_fallocate(fd, 0, nbytes)
            mm = mmap.mmap(fd, nbytes)
        except OSError as e:
            os.close(fd)
            self.failed = f"{type(e).__name__}: {e}"
            log.info("flor_nb: a %d-byte snapshot buffer did not fit in shared memory (%s); it goes to the saver "
                     "by copy", nbytes, e)
            return None
        t = torch.frombuffer(mm, dtype=torch.uint8).view(dtype).view(shape)
        if pinned:
            why = _cuda_call("cudaHostRegister", t.data_ptr(), nbytes, 1)  # 1: cudaHostRegisterPortable
            if why:
                os.close(fd)
                self.pin_failed = why
                log.info("flor_nb: shared snapshot buffers cannot be page-locked here (%s); snapshots of CUDA "
                         "tensors go to private pinned buffers, written by the kernel's thread", why)
                return None
        with self._lock:
            bid, self._next = self._next, self._next + 1
            self._by_ptr[t.data_ptr()] = (bid, nbytes, t, pinned)
            self._new.append((bid, fd))
        return t

    def give_back(self, buffers) -> list[int]:
        """Buffers a recording is done with: kept for the next one up to :data:`KEEP_BYTES`, page-locked ones up
        to :data:`KEEP_PINNED_BYTES` (the smallest first, so the most tensors are reused); returns the ids of the
        others, which the caller has the saver unmap."""
        mine = sorted((t for t in buffers if self.ref(t) is not None), key=lambda t: t.nbytes)
        dropped = []
        with self._lock:
            kept = {False: 0, True: 0}  # pageable, page-locked
            for (_, _, pinned), ts in self._free.items():
                kept[pinned] += sum(t.nbytes for t in ts)
            for t in mine:
                pinned = self._by_ptr[t.data_ptr()][3]
                if kept[pinned] + t.nbytes <= (KEEP_PINNED_BYTES if pinned else KEEP_BYTES):
                    self._free.setdefault((t.dtype, tuple(t.shape), pinned), []).append(t)
                    kept[pinned] += t.nbytes
                else:
                    bid, _, _, pinned = self._by_ptr.pop(t.data_ptr())
                    if pinned:  # before its pages are unmapped (here, once the tensor is freed)
                        _cuda_call("cudaHostUnregister", t.data_ptr())
                    dropped.append(bid)
        return dropped

    def ref(self, t: torch.Tensor) -> int | None:
        """The buffer id of ``t`` when it is one of these buffers, whole; else None."""
        if t.device.type != "cpu" or t.layout != torch.strided:
            return None
        hit = self._by_ptr.get(t.data_ptr())
        if hit is None or hit[1] != t.nbytes or not t.is_contiguous():
            return None
        return hit[0]

    def take_new(self) -> list[tuple[int, int]]:
        """The (id, fd) pairs not handed over yet; the caller sends and closes the fds."""
        with self._lock:
            new, self._new = self._new, []
        return new


def _cuda_call(name: str, *args) -> str | None:
    """Call the CUDA runtime's ``name`` on a thread of its own; None on success, else why it failed.

    A failed runtime call leaves its error as the calling thread's "last error", which the next kernel launch
    of that thread reports as its own: on a short-lived thread it never reaches training.
    """
    out: list = []

    def call():
        try:
            code = int(getattr(torch.cuda.cudart(), name)(*args))
            out.append(None if code == 0 else f"{name} returned CUDA error {code}")
        except Exception as e:  # noqa: BLE001 - any failure means: not page-locked; said by the caller
            out.append(f"{name} failed: {type(e).__name__}: {e}")

    th = threading.Thread(target=call, name="flor_nb-cuda-register")
    th.start()
    th.join()
    return out[0] if out else f"{name} did not return"
