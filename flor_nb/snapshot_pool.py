"""Host buffers for snapshots: reused across checkpoints, pinned and filled on a side stream for CUDA tensors."""
from __future__ import annotations

import threading

import torch

from . import devices


class BufferPool:
    """Reusable host tensors for snapshots.

    ``copy_`` into memory already touched is several times faster than ``clone``
    into fresh pages (measured here: 18 vs 2.2 GB/s); buffers go back to the pool
    once the writer has persisted their snapshot. With ``shared`` (a
    :class:`~flor_nb.shared_buffers.SharedBuffers`), buffers live in shared memory for the saver process,
    page-locked there for CUDA tensors.

    CUDA tensors go to pinned host buffers (``pin_memory``; default: when CUDA is available),
    copied with ``non_blocking=True`` on a side stream of their device, never cloned on the GPU
    (see :func:`flor_nb.devices.staging`). :meth:`seal` ends a snapshot: it records an event per
    device, makes the training stream wait for it on the GPU (the next kernel that may overwrite a
    source is ordered after the copy; the training thread itself does not block) and returns the
    events, which the writer waits for before it reads the buffers.
    """

    def __init__(self, pin_memory: bool | None = None, shared=None):
        self.shared = shared  # SharedBuffers: unpinned buffers in memory a saver process maps (saver.py)
        self._borrowed: list = []  # the shared buffers this pool holds, given back by close()
        self._free: dict = {}
        self._lock = threading.Lock()
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._streams: dict = {}  # device -> side stream for copies off it
        self._open: dict = {}  # device -> side stream with copies not yet sealed

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        how = devices.staging(t)
        if how == "pool":
            return self._buffer(t, pinned=False).copy_(t)
        if how == "pinned":
            return self.copy_async(t)
        if how == "host":
            return t.to("cpu", copy=True)
        return t.clone()

    def _buffer(self, t: torch.Tensor, pinned: bool) -> torch.Tensor:
        key = (t.dtype, tuple(t.shape), pinned)
        with self._lock:
            free = self._free.get(key)
            buf = free.pop() if free else None
        if buf is None and self.shared is not None:
            buf = self.shared.empty(key[1], t.dtype, pinned=pinned)
            if buf is not None:
                self._borrowed.append(buf)
        if buf is None:
            buf = torch.empty(key[1], dtype=t.dtype, pin_memory=pinned)
        return buf

    def copy_async(self, t: torch.Tensor, stream=None) -> torch.Tensor:
        """Copy ``t`` into a pooled (pinned, when the pool pins) host buffer without blocking: on a side
        stream of ``t``'s device when it is a CUDA tensor (``stream`` overrides it), else a plain copy."""
        buf = self._buffer(t, pinned=self.pin_memory)
        if t.device.type != "cuda":
            return buf.copy_(t, non_blocking=self.pin_memory)
        side = stream or self._side(t.device)
        with torch.cuda.stream(side):
            buf.copy_(t, non_blocking=True)
        t.record_stream(side)  # memory freed by training is not reused before the copy has read it
        return buf

    def _side(self, device):
        side = self._open.get(device)
        if side is None:
            side = self._streams.get(device)
            if side is None:
                side = self._streams[device] = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))  # copy what training computed so far
            self._open[device] = side
        return side

    def seal(self) -> list:
        """End a snapshot's copies: the events the writer must wait for (empty: nothing is in flight)."""
        events = []
        for device, side in self._open.items():
            event = torch.cuda.Event()
            event.record(side)
            torch.cuda.current_stream(device).wait_event(event)  # GPU-side: later writes wait for the copy
            events.append(event)
        self._open = {}
        return events

    def close(self) -> list[int]:
        """The recording is over: its shared buffers go back for the next one (ids of those unmapped instead)."""
        if self.shared is None:
            return []
        borrowed, self._borrowed = self._borrowed, []
        with self._lock:
            self._free = {}
        return self.shared.give_back(borrowed)

    def release(self, snap: dict | None):
        if snap is None:
            return
        stack = list(snap["tensors"].values())
        with self._lock:
            while stack:
                tree = stack.pop()
                if isinstance(tree, torch.Tensor):
                    if tree.device.type == "cpu" and tree.layout == torch.strided and tree.is_contiguous():
                        pinned = self.pin_memory and tree.is_pinned()
                        self._free.setdefault((tree.dtype, tuple(tree.shape), pinned), []).append(tree)
                elif isinstance(tree, dict):
                    stack.extend(tree.values())
                elif isinstance(tree, (list, tuple)):
                    stack.extend(tree)


def wait_copies(snap: dict) -> None:
    """Block until a snapshot's device-to-host copies have landed (the writer calls it before reading)."""
    for event in snap.get("events") or ():
        event.synchronize()


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A snapshot's copy without a pool: on the host, never a second copy in GPU memory."""
    t = t.detach()
    return t.clone() if devices.staging(t) in ("pool", "clone") else t.to("cpu", copy=True)
