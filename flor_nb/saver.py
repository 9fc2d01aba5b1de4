"""Checkpoints persisted by a separate saver process, off the training process's GIL (REFT's design).

The training thread copies a snapshot into shared-memory buffers (:mod:`flor_nb.shared_buffers`); the
writer thread hands the saver a small message naming those buffers, plus the snapshot's pickled Python
part through a shared mailbox, and waits, blocked, for the answer. The saver hashes, compresses and
writes the blobs and the checkpoint file (the same :func:`flor_nb.checkpoint.split` and
:func:`~flor_nb.checkpoint.write` a thread would run) and answers with their digests and sizes; the
writer thread then stores the index rows. Measured here (``bench/gil_stalls.py``, a 5.6 MB checkpoint): a
Python-bound training thread lost 9.5 ms per checkpoint to the GIL while a writer thread persisted it, 1.5 ms
while the saver did.

The saver is forked from the forkserver the replay workers use (torch already imported there), started
in the background, and serves every recording of the kernel. Until it is up, and for the rest of a recording
in which it died (the next recording starts a new one), checkpoints are written by the writer thread as
before (:func:`save_here`): nothing is lost, and the run's timings say which wrote what.
"""
from __future__ import annotations

import atexit
import logging
import mmap
import os
import pickle
import signal
import socket
import sys
import threading
import time
from multiprocessing import reduction
from typing import NamedTuple

import torch

from . import checkpoint, lifeline, signing
from .errors import InputError
from .shared_buffers import SharedBuffers, available
from .state import wait_copies
from .trees import map_tree

log = logging.getLogger(__name__)

_FDS_PER_MESSAGE = 250  # SCM_RIGHTS carries at most 253 descriptors per message on Linux


class SaverGone(RuntimeError):
    """The saver process ended or could not be reached; the checkpoint is written by the thread instead."""


def mode() -> str:
    """``process`` where checkpoints can be persisted by a saver process here, else ``thread``.

    ``FLOR_NB_SAVER=thread`` keeps them in the kernel's writer thread.
    """
    chosen = os.environ.get("FLOR_NB_SAVER") or "process"
    if chosen not in ("process", "thread"):
        raise InputError(f"FLOR_NB_SAVER={chosen!r} is not allowed: use 'process' (the default: checkpoints are "
                         "written by a saver process) or 'thread' (by a thread of this process).")
    if chosen == "thread" or not available():
        return "thread"
    import multiprocessing as mp

    return "process" if "forkserver" in mp.get_all_start_methods() else "thread"


def save_here(home, rel, snap, end_rel=None, end_snap=None) -> dict:
    """Split and write a checkpoint (and its end snapshot) in this process.

    Returns ``digests`` (per snapshot, made even when writing fails, so the run keeps them), ``info`` and
    ``end`` (what :func:`flor_nb.checkpoint.write` returned) and ``error`` (the exception, or None). The saver
    adds ``cpu``, its CPU seconds for the job.
    """
    out = {"digests": [None, None], "info": None, "end": None, "error": None}
    try:
        parts = checkpoint.split(snap)
        end_parts = None if end_snap is None else checkpoint.split(end_snap)
        out["digests"] = [parts[3], None if end_parts is None else end_parts[3]]
        out["info"] = checkpoint.write(home, rel, snap, parts=parts)
        if end_snap is not None:
            out["end"] = checkpoint.write(home, end_rel, end_snap, parts=end_parts)
    except BaseException as e:  # noqa: BLE001 - handed back to the writer, which reports it
        out["error"] = e
    return out


class _Shared(NamedTuple):
    """A tensor in a shared buffer, as the saver finds it: buffer id, dtype name, shape."""

    bid: int
    dtype: str
    shape: tuple


_current: list = []  # [the Saver of this process], while it lives
_current_lock = threading.Lock()


def current() -> Saver:
    """This process's saver: the running one, or a new one (with new buffers) if there is none or it died.

    One saver serves every recording of a kernel, one checkpoint at a time, and keeps their buffers mapped
    between recordings (see :mod:`flor_nb.shared_buffers`); it ends with the kernel.
    """
    with _current_lock:
        if _current and _current[0].gone is None and not _current[0].alive():
            _current[0]._lost(EOFError())  # it died between recordings
        if not _current or _current[0].gone is not None:
            if not _current:
                atexit.register(_hang_up)
            _current[:] = [Saver(SharedBuffers())]
        return _current[0]


def _hang_up():
    """At exit: close this end of the saver's connection; the saver reads EOF and ends."""
    for saver in _current:
        saver.hang_up()


class Saver:
    """The kernel's end of the saver process (see the module doc). Use :func:`current`."""

    def __init__(self, buffers: SharedBuffers):
        self.buffers = buffers
        self.gone: str | None = None  # why checkpoints went back to the thread, once they did
        self._lock = threading.Lock()  # one job at a time on the connection
        self._proc = self._conn = self._sock = None
        self._mailbox = None  # (id, mmap, fd to send or None)
        self._boxes = 0
        self._ready = threading.Event()
        main = sys.modules.get("__main__")
        if getattr(main, "__file__", None) is None:  # a kernel: fork the saver while training starts
            threading.Thread(target=self._start, name="flor_nb-saver-start", daemon=True).start()
        else:  # a script: start it now, its __main__ hidden (see executor._no_main), before training runs
            self._start()

    def _start(self):
        from . import executor

        try:
            ctx = executor.context()
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=serve, args=(child, os.getpid()), name="flor_nb-saver", daemon=True)
            with executor._no_main():
                proc.start()
            child.close()
            self._proc, self._conn = proc, parent
            self._sock = socket.fromfd(parent.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
        except Exception as e:  # noqa: BLE001 - no saver: the writer thread writes, as before
            self.gone = f"the saver process could not start ({type(e).__name__}: {e})"
            log.info("flor_nb: %s; checkpoints are written by a thread", self.gone)
        finally:
            self._ready.set()

    def usable(self) -> bool:
        return self._ready.is_set() and self.gone is None

    def alive(self) -> bool:
        """Not known dead: still starting, or its process is running."""
        return not self._ready.is_set() or (self._proc is not None and self._proc.is_alive())

    def save(self, home, rel, snap, end_rel=None, end_snap=None) -> dict:
        """:func:`save_here`, run by the saver process; raises :class:`SaverGone` when it is not there.

        The job carries this process's environment and signing key: a forkserver's environment may predate
        the kernel's (object store settings), and the key may have moved since the saver started."""
        job = {"home": home, "rel": rel, "end_rel": end_rel, "snap": self._encode(snap), "end": self._encode(end_snap),
               "environ": dict(os.environ), "key": str(signing.key_path())}
        data = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            return self._send(data)

    def forget(self, ids: list[int]):
        """Have the saver unmap buffers this process no longer keeps (no answer is awaited)."""
        if not ids or not self.usable():
            return
        with self._lock:
            try:
                self._conn.send({"drop": ids})
            except OSError as e:
                self._lost(e)

    def _send(self, data: bytes) -> dict:
        if self.gone is not None:
            raise SaverGone(self.gone)
        new = self.buffers.take_new()
        box = self._box(len(data))
        box[1][:len(data)] = data
        if box[2] is not None:
            new.append((box[0], box[2]))
            self._mailbox = (box[0], box[1], None)
        try:
            self._conn.send({"fds": [[bid for bid, _ in chunk] for chunk in _chunks(new)], "mailbox": (box[0], len(data))})
            for chunk in _chunks(new):
                reduction.sendfds(self._sock, [fd for _, fd in chunk])
            reply = self._conn.recv()
        except (EOFError, OSError) as e:
            raise SaverGone(self._lost(e)) from None
        finally:
            for _, fd in new:
                os.close(fd)
        return reply

    def _encode(self, snap):
        if snap is None:
            return None
        wait_copies(snap)

        def leaf(t):
            bid = self.buffers.ref(t)
            return t if bid is None else _Shared(bid, str(t.dtype).removeprefix("torch."), tuple(t.shape))

        out = {key: snap[key] for key in ("python", "digests", "roots", "not_captured") if key in snap}
        out["tensors"] = {key: map_tree(value, leaf) for key, value in snap["tensors"].items()}
        return out

    def _box(self, n: int):
        """The mailbox, grown to hold ``n`` bytes: (id, mmap, fd when the saver has not been sent it)."""
        if self._mailbox is None or len(self._mailbox[1]) < n:
            size = max(1 << 20, 1 << (n - 1).bit_length())
            fd = os.memfd_create("flor_nb-mailbox", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            self._boxes += 1
            self._mailbox = (f"box{self._boxes}", mmap.mmap(fd, size), fd)
        return self._mailbox

    def _lost(self, error) -> str:
        code = None
        if self._proc is not None:
            self._proc.join(2)
            code = self._proc.exitcode
        # 255: the forkserver's status pipe was empty (another thread, e.g. multiprocessing.active_children(),
        # read the status first), not an exit code the saver chose: it never exits with 255.
        how = (f"was killed by signal {-code}" if code is not None and code < 0 else
               "ended (its exit status could not be read)" if code == 255 else
               f"exited with code {code}" if code is not None else f"stopped answering ({type(error).__name__})")
        self.gone = f"the checkpoint saver process (pid {getattr(self._proc, 'pid', '?')}) {how}"
        self.hang_up()
        return self.gone

    def hang_up(self):
        """Close this end of the connection: the saver reads EOF and ends."""
        for end in (self._sock, self._conn):
            if end is not None:
                end.close()


def _chunks(items: list) -> list:
    return [items[i:i + _FDS_PER_MESSAGE] for i in range(0, len(items), _FDS_PER_MESSAGE)]


# -- the saver process ---------------------------------------------------------------------------------


def serve(conn, owner: int):
    """The saver's loop: map the buffers it is sent, write each checkpoint asked, answer; end on EOF."""
    lifeline.watch(owner)  # the kernel died (even by SIGKILL): nothing is left to write for
    # Jupyter interrupts a kernel (stops a training cell) by signalling its process group, this process with it:
    # it must not die of it, nor fail the write in progress. It ends on EOF or with the kernel.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:  # let training threads win the cores, as the writer thread does
        os.setpriority(os.PRIO_PROCESS, 0, 10)
    except OSError:
        pass
    sock = socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
    maps: dict = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the kernel hung up (hang_up) or died
            return
        if "drop" in msg:
            for bid in msg["drop"]:
                _unmap(maps.pop(bid, None))
            continue
        for ids in msg["fds"]:
            for bid, fd in zip(ids, reduction.recvfds(sock, len(ids))):
                if isinstance(bid, str):  # a new mailbox: the old one goes
                    for old in [k for k in maps if isinstance(k, str)]:
                        _unmap(maps.pop(old))
                maps[bid] = mmap.mmap(fd, os.fstat(fd).st_size)
                os.close(fd)
        box, n = msg["mailbox"]
        cpu = time.process_time()
        job = pickle.loads(maps[box][:n])
        if job["environ"] != os.environ:
            os.environ.clear()
            os.environ.update(job["environ"])
        signing.use_key(job["key"])
        reply = save_here(job["home"], job["rel"], _decode(job["snap"], maps), job["end_rel"],
                          _decode(job["end"], maps))
        reply["cpu"] = time.process_time() - cpu  # the whole process's: hashing and compressing may use threads
        conn.send(_sendable(reply))


def _unmap(m):
    try:
        if m is not None:
            m.close()
    except BufferError:  # a tensor of the last job still views it: unmapped when that is freed
        pass


def _decode(snap, maps):
    if snap is None:
        return None

    def tensor(s: _Shared):
        return torch.frombuffer(maps[s.bid], dtype=torch.uint8).view(getattr(torch, s.dtype)).view(s.shape)

    snap["tensors"] = {key: map_tree(v, tensor, lambda x: isinstance(x, _Shared)) for key, v in snap["tensors"].items()}
    return snap


def _sendable(reply: dict) -> dict:
    """The reply, its error made picklable (the type and message kept, and errno for a full disk)."""
    error = reply.get("error")
    if error is not None:
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:  # noqa: BLE001
            reply["error"] = RuntimeError(f"{type(error).__name__}: {error}")
    return reply
