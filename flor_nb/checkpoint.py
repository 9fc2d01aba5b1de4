"""Checkpoints on disk: content-addressed blobs plus one small file per checkpoint.

Every tensor, and every pickled group of Python values, is stored once by the
hash of its bytes under ``blobs/``, so what did not change since the last
checkpoint (a frozen backbone, a dataset held in memory, a config) costs
nothing more. A checkpoint file holds:
``FLORCKPT`` + 8-byte header length + JSON header + skeleton + Python part.
The skeleton is the tensor tree with each tensor replaced by a reference
(``torch.save``, loaded with ``weights_only=True``); the Python part is a
pickle of plain values (RNG states, flags) and references to pickled blobs.
The header names the hash algorithm; blobs and files are written to a temp
name, fsynced and renamed, and verified by hash on load. A tensor whose bytes
are all zero (Adam's state of parameters that got no gradient, zeroed buffers)
has no blob: the header lists its hash under ``zeros`` (schema 4) and load
builds it with ``torch.zeros``. The skeleton, and so every digest, is the same
as if its bytes had been stored.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
from pathlib import Path

import torch

from .errors import FlorError
from .hashing import DEFAULT, hash_bytes, known
from .state import _raw
from .trees import map_tree

MAGIC = b"FLORCKPT"
SCHEMA = 4  # 4: all-zero tensors are listed in the header's "zeros" instead of stored as blobs
_READS = (2, 3, 4)
_PY_BLOBS = ("py/", "leaves/")  # Python entries stored as blobs (pickled bytes)
ROOTS = "__roots__"  # not a stream: the roots' order, kept with the digests


class CorruptCheckpointError(FlorError):
    """A checkpoint file or blob is missing, truncated, or fails its hash check."""


def _ref(t: torch.Tensor, blobs: dict, algorithm: str) -> dict:
    raw = _raw(t)
    h = hash_bytes(raw, algorithm)
    blobs.setdefault(h, raw)
    return {"__blob__": h, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}


_ZERO_HASHES: dict = {}  # (bytes, algorithm) -> hash of that many zero bytes


def _zero_hash(n: int, algorithm: str) -> str:
    key = (n, algorithm)
    if key not in _ZERO_HASHES:
        _ZERO_HASHES[key] = hash_bytes(bytes(n), algorithm)
    return _ZERO_HASHES[key]


def zero_blobs(blobs: dict, algorithm: str = DEFAULT) -> set[str]:
    """The blobs of ``blobs`` ({hash: bytes}) whose bytes are all zero: found by their hash, which is
    computed anyway, against the (cached) hash of as many zero bytes, so no extra pass over the data
    (only blobs whose first bytes are zero are compared)."""
    return {h for h, raw in blobs.items()
            if len(raw) and not any(raw[:64]) and h == _zero_hash(len(raw), algorithm)}


def tensor_digests(tensors: dict, algorithm: str = DEFAULT) -> dict:
    """Per-entry digests of the tensor part, equal for equal states."""
    blobs: dict = {}
    return {key: hash_bytes(repr(map_tree(v, lambda t: _ref(t, blobs, algorithm))).encode(), algorithm)
            for key, v in tensors.items()}


def split(snap: dict, algorithm: str = DEFAULT) -> tuple[dict, dict, dict, dict]:
    """Return (skeleton, python part, {hash: bytes}, {stream: digest}) for a snapshot (see state.py)."""
    blobs: dict = {}
    skeleton = {key: map_tree(value, lambda t: _ref(t, blobs, algorithm)) for key, value in snap["tensors"].items()}
    digests = {key: hash_bytes(repr(value).encode(), algorithm) for key, value in skeleton.items()}
    digests.update(snap.get("digests", {}))
    digests[ROOTS] = snap.get("roots", [])  # the walk order: a replay walks the same way to compare
    python = {}
    for key, value in snap["python"].items():
        if key.startswith(_PY_BLOBS) and isinstance(value, bytes):
            h = hash_bytes(value, algorithm)
            blobs.setdefault(h, value)
            python[key] = {"__pyblob__": h}
        elif key.startswith("chunks/"):  # a long list: one blob per chunk, so unchanged chunks dedup
            hashes = []
            for chunk in value:
                h = hash_bytes(chunk, algorithm)
                blobs.setdefault(h, chunk)
                hashes.append(h)
            python[key] = {"__pyblobs__": hashes}
        else:
            python[key] = value
    return skeleton, python, blobs, digests


def write(home: Path, rel: str, snap: dict, algorithm: str = DEFAULT) -> dict:
    """Persist a snapshot: new blobs, then the checkpoint file. Returns sizes, checksum and digests."""
    skeleton, python, blobs, digest = split(snap, algorithm)
    tensor_blobs: dict = {}
    map_tree(skeleton, lambda r: tensor_blobs.setdefault(r["__blob__"], blobs[r["__blob__"]]), _is_ref)
    zeros = zero_blobs(tensor_blobs, algorithm)
    new_bytes = 0
    new = []
    for h, raw in blobs.items():
        if h in zeros:
            continue
        path = home / "blobs" / h[:2] / h
        if not path.exists():
            _atomic(path, raw)
            new_bytes += len(raw)
            new.append(h)
    buf = io.BytesIO()
    torch.save(skeleton, buf)
    skel = buf.getvalue()
    py = pickle.dumps(python, protocol=pickle.HIGHEST_PROTOCOL)
    header = json.dumps({
        "schema": SCHEMA,
        "hash": algorithm,
        "parts": [len(skel), len(py)],
        "checksums": [hash_bytes(skel, algorithm), hash_bytes(py, algorithm)],
        "digests": digest,
        "roots": snap.get("roots", []),
        "not_captured": snap.get("not_captured", {}),
        "zeros": sorted(zeros),
    }).encode()
    data = MAGIC + struct.pack("<Q", len(header)) + header + skel + py
    _atomic(home / rel, data)
    return {
        "bytes": new_bytes + len(data),
        "logical_bytes": sum(len(r) for h, r in blobs.items() if h not in zeros) + len(data),
        "checksum": hash_bytes(data, algorithm),
        "digests": digest,
        "file_bytes": len(data),
        "blobs": {h: len(r) for h, r in blobs.items() if h not in zeros},  # every blob the file refers to
        "new_blobs": new,  # the blobs this write created (the others were on disk already)
        "zero_bytes": sum(len(blobs[h]) for h in zeros),
    }


def read(home: Path, rel: str) -> dict:
    """Load and verify a checkpoint; return a snapshot dict (see state.py) with its ``header``."""
    path = Path(home) / rel
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"Checkpoint file {path} is missing. Replay other epochs or record again.") from None
    if not data.startswith(MAGIC):
        raise CorruptCheckpointError(f"{path} is not a flor_nb checkpoint.")
    (hlen,) = struct.unpack("<Q", data[8:16])
    try:
        header = json.loads(data[16:16 + hlen])
    except ValueError:
        raise CorruptCheckpointError(f"Checkpoint {path} is damaged (its header does not parse). "
                                     "Replay from another epoch.") from None
    if header.get("schema") not in _READS:
        raise CorruptCheckpointError(f"{path} has checkpoint schema {header.get('schema')}; this flor_nb reads "
                                     f"{', '.join(map(str, _READS))}.")
    algorithms = [header["hash"]] if "hash" in header else ["xxh3_128", "blake2b_128"]  # schema 2 did not say
    if not all(known(a) for a in algorithms):
        raise CorruptCheckpointError(f"{path} was hashed with {header['hash']}, which this flor_nb does not know.")
    start = 16 + hlen
    n_skel, n_py = header["parts"]
    skel, py = data[start:start + n_skel], data[start + n_skel:start + n_skel + n_py]
    algorithm = next((a for a in algorithms if [hash_bytes(skel, a), hash_bytes(py, a)] == header["checksums"]), None)
    if algorithm is None:
        raise CorruptCheckpointError(f"Checkpoint {path} is damaged (checksum mismatch). Replay from another epoch.")
    skeleton = torch.load(io.BytesIO(skel), weights_only=True)
    zeros = set(header.get("zeros", ()))
    cache: dict = {}

    def blob(h: str) -> bytearray:
        if h not in cache:
            cache[h] = _blob(Path(home), h, algorithm)
        return cache[h]

    def tensor(r: dict) -> torch.Tensor:
        dtype = getattr(torch, r["dtype"])
        if r["__blob__"] in zeros:
            return torch.zeros(r["shape"], dtype=dtype)
        raw = blob(r["__blob__"])
        if not raw:
            return torch.empty(r["shape"], dtype=dtype)
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(r["shape"]).clone()

    tensors = {k: map_tree(v, tensor, _is_ref) for k, v in skeleton.items()}
    python = pickle.loads(py)
    for key, value in python.items():
        if isinstance(value, dict) and "__pyblob__" in value:
            python[key] = bytes(blob(value["__pyblob__"]))
        elif isinstance(value, dict) and "__pyblobs__" in value:
            python[key] = [bytes(blob(h)) for h in value["__pyblobs__"]]
    return {"tensors": tensors, "python": python, "header": header}


def _is_ref(x) -> bool:
    return isinstance(x, dict) and "__blob__" in x


def _blob(home: Path, h: str, algorithm: str) -> bytearray:
    path = home / "blobs" / h[:2] / h
    try:
        raw = bytearray(path.read_bytes())
    except FileNotFoundError:
        raise CorruptCheckpointError(f"Blob {path} is missing. Replay other epochs or record again.") from None
    if hash_bytes(raw, algorithm) != h:
        raise CorruptCheckpointError(f"Blob {path} is damaged (hash mismatch). Replay other epochs.")
    return raw


def _atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def references(home: Path, rel: str) -> set[str]:
    """The blobs a checkpoint file refers to (tensors and pickled Python parts), without loading any.

    Raises :class:`CorruptCheckpointError` when the file is missing or damaged: a caller that
    frees space must then keep every blob (it cannot tell which ones the file needs).
    """
    path = Path(home) / rel
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"Checkpoint file {path} is missing.") from None
    if not data.startswith(MAGIC):
        raise CorruptCheckpointError(f"{path} is not a flor_nb checkpoint.")
    (hlen,) = struct.unpack("<Q", data[8:16])
    try:
        header = json.loads(data[16:16 + hlen])
        n_skel, n_py = header["parts"]
    except (ValueError, KeyError, TypeError):
        raise CorruptCheckpointError(f"Checkpoint {path} is damaged (its header does not parse).") from None
    start = 16 + hlen
    skeleton = torch.load(io.BytesIO(data[start:start + n_skel]), weights_only=True)
    python = pickle.loads(data[start + n_skel:start + n_skel + n_py])
    found: set[str] = set()
    map_tree(skeleton, lambda r: found.add(r["__blob__"]), lambda x: isinstance(x, dict) and "__blob__" in x)
    found.update(v["__pyblob__"] for v in python.values() if isinstance(v, dict) and "__pyblob__" in v)
    for v in python.values():
        if isinstance(v, dict) and "__pyblobs__" in v:
            found.update(v["__pyblobs__"])
    return found - set(header.get("zeros", ()))


def blob_path(home: Path, h: str) -> Path:
    """Where blob ``h`` lives in a store."""
    return Path(home) / "blobs" / h[:2] / h
