"""Checkpoint files: one per epoch boundary, written atomically, checked on load.

File layout: ``FLORCKPT`` + 8-byte header length + JSON header + tensor part
(``torch.save``, loaded with ``weights_only=True``) + Python part (pickle: loop
variables, numpy and ``random`` RNG states). The header holds the schema
version, each part's length and blake2b checksum, and per-entry digests.
Boundary ``k`` is the state just before epoch ``k`` runs (``0``: before the loop).
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

MAGIC = b"FLORCKPT"
SCHEMA = 1


class CorruptCheckpointError(FlorError):
    """A checkpoint file is truncated or its checksum does not match."""


def encode(snap: dict, digests: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(snap["tensors"], buf)
    tensor_part = buf.getvalue()
    python_part = pickle.dumps(snap["python"], protocol=pickle.HIGHEST_PROTOCOL)
    header = json.dumps({
        "schema": SCHEMA,
        "parts": [len(tensor_part), len(python_part)],
        "checksums": [_sum(tensor_part), _sum(python_part)],
        "digests": digests,
        "skipped": snap.get("skipped", {}),
    }).encode()
    return MAGIC + struct.pack("<Q", len(header)) + header + tensor_part + python_part


def write(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename); return its checksum."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return _sum(data)


def read(path: Path) -> dict:
    """Load and verify a checkpoint; return a snapshot dict (see state.py) plus its header."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"Checkpoint file {path} is missing. Record the run again.") from None
    if not data.startswith(MAGIC):
        raise CorruptCheckpointError(f"{path} is not a flor_nb checkpoint.")
    (hlen,) = struct.unpack("<Q", data[8:16])
    header = json.loads(data[16:16 + hlen])
    if header["schema"] > SCHEMA:
        raise CorruptCheckpointError(f"{path} was written by a newer flor_nb (schema {header['schema']}); upgrade flor_nb.")
    start = 16 + hlen
    t_len, p_len = header["parts"]
    tensor_part = data[start:start + t_len]
    python_part = data[start + t_len:start + t_len + p_len]
    if [_sum(tensor_part), _sum(python_part)] != header["checksums"]:
        raise CorruptCheckpointError(f"Checkpoint {path} is damaged (checksum mismatch). Replay from another epoch.")
    tensors = torch.load(io.BytesIO(tensor_part), weights_only=True)
    return {"tensors": tensors, "python": pickle.loads(python_part), "header": header}


def _sum(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()
