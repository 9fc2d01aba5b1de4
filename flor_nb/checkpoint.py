"""Checkpoints on disk: content-addressed tensor blobs plus one small file per checkpoint.

Every tensor is stored once by the hash of its bytes under ``blobs/``, so a
tensor that did not change since the last checkpoint (a frozen backbone, an
embedding table) costs nothing more. A checkpoint file holds:
``FLORCKPT`` + 8-byte header length + JSON header + skeleton + Python part.
The skeleton is the tensor tree with each tensor replaced by a reference
(``torch.save``, loaded with ``weights_only=True``); the Python part is a
pickle of loop variables and numpy/``random`` RNG states. Blobs and files are
written to a temp name, fsynced and renamed, and verified by hash on load.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
from pathlib import Path

import torch

from .errors import FlorError
from .state import map_tree

try:
    import xxhash

    def _hash(data) -> str:
        return xxhash.xxh3_128_hexdigest(data)
except ImportError:  # pragma: no cover - xxhash is a dependency; blake2b is ~20x slower
    def _hash(data) -> str:
        return hashlib.blake2b(data, digest_size=16).hexdigest()

MAGIC = b"FLORCKPT"
SCHEMA = 2


class CorruptCheckpointError(FlorError):
    """A checkpoint file or blob is missing, truncated, or fails its hash check."""


def _raw(t: torch.Tensor):
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else b""


def split(snap: dict) -> tuple[dict, dict, dict]:
    """Return (skeleton, {hash: bytes}, {entry: digest}) for a snapshot (see state.py)."""
    blobs: dict = {}

    def ref(t: torch.Tensor) -> dict:
        raw = _raw(t)
        h = _hash(raw)
        blobs.setdefault(h, raw)
        return {"__blob__": h, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}

    skeleton = {key: map_tree(value, ref) for key, value in snap["tensors"].items()}
    digests = {key: _hash(repr(value).encode()) for key, value in skeleton.items()}
    for key, value in snap["python"].items():
        if key.startswith("var/"):
            digests[key] = _hash(value)
    return skeleton, blobs, digests


def digests(snap: dict) -> dict:
    """Per-entry digests, equal for equal states: how replay tells where it diverged."""
    return split(snap)[2]


def write(home: Path, rel: str, snap: dict) -> dict:
    """Persist a snapshot: new blobs, then the checkpoint file. Returns sizes, checksum and digests."""
    skeleton, blobs, digest = split(snap)
    new_bytes = 0
    for h, raw in blobs.items():
        path = home / "blobs" / h[:2] / h
        if not path.exists():
            _atomic(path, raw)
            new_bytes += len(raw)
    buf = io.BytesIO()
    torch.save(skeleton, buf)
    skel = buf.getvalue()
    py = pickle.dumps(snap["python"], protocol=pickle.HIGHEST_PROTOCOL)
    header = json.dumps({
        "schema": SCHEMA,
        "parts": [len(skel), len(py)],
        "checksums": [_hash(skel), _hash(py)],
        "digests": digest,
        "skipped": snap.get("skipped", {}),
    }).encode()
    data = MAGIC + struct.pack("<Q", len(header)) + header + skel + py
    _atomic(home / rel, data)
    return {
        "bytes": new_bytes + len(data),
        "logical_bytes": sum(len(r) for r in blobs.values()) + len(data),
        "checksum": _hash(data),
        "digests": digest,
    }


def read(home: Path, rel: str) -> dict:
    """Load and verify a checkpoint; return a snapshot dict (see state.py)."""
    path = Path(home) / rel
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"Checkpoint file {path} is missing. Replay other epochs or record again.") from None
    if not data.startswith(MAGIC):
        raise CorruptCheckpointError(f"{path} is not a flor_nb checkpoint.")
    (hlen,) = struct.unpack("<Q", data[8:16])
    header = json.loads(data[16:16 + hlen])
    if header["schema"] != SCHEMA:
        raise CorruptCheckpointError(f"{path} has checkpoint schema {header['schema']}; this flor_nb reads {SCHEMA}.")
    start = 16 + hlen
    n_skel, n_py = header["parts"]
    skel, py = data[start:start + n_skel], data[start + n_skel:start + n_skel + n_py]
    if [_hash(skel), _hash(py)] != header["checksums"]:
        raise CorruptCheckpointError(f"Checkpoint {path} is damaged (checksum mismatch). Replay from another epoch.")
    skeleton = torch.load(io.BytesIO(skel), weights_only=True)
    cache: dict = {}

    def tensor(r: dict) -> torch.Tensor:
        h = r["__blob__"]
        if h not in cache:
            cache[h] = _blob(Path(home), h)
        raw, dtype = cache[h], getattr(torch, r["dtype"])
        if not raw:
            return torch.empty(r["shape"], dtype=dtype)
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(r["shape"]).clone()

    def is_ref(x):
        return isinstance(x, dict) and "__blob__" in x

    tensors = {k: map_tree(v, tensor, is_ref) for k, v in skeleton.items()}
    return {"tensors": tensors, "python": pickle.loads(py), "header": header}


def _blob(home: Path, h: str) -> bytearray:
    path = home / "blobs" / h[:2] / h
    try:
        raw = bytearray(path.read_bytes())
    except FileNotFoundError:
        raise CorruptCheckpointError(f"Tensor blob {path} is missing. Replay other epochs or record again.") from None
    if _hash(raw) != h:
        raise CorruptCheckpointError(f"Tensor blob {path} is damaged (hash mismatch). Replay other epochs.")
    return raw


def _atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
