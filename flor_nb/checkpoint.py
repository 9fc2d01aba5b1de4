"""Checkpoints on disk: content-addressed blobs plus one small, signed file per checkpoint.

Every tensor, and every pickled group of Python values, is stored once by the
hash of its bytes under ``blobs/``, so what did not change since the last
checkpoint (a frozen backbone, a dataset held in memory, a config) costs
nothing more. A pickled blob is stored zlib-compressed (``FLZ1 | 8-byte length | zlib``, blob_pack.py) where that
saves a tenth or more; its name, and its HMAC, stay those of the uncompressed bytes. A torch generator's
state (its 624 words are held in 8 bytes each) and a history of floats (``fchunks/``, a loss list kept
as float32 or float64 tensors) are compressed with their bytes shuffled by value width
(``FLZ2 | length | width | zlib``), so zero halves and exponents sit together. Other tensor blobs are
stored raw (float weights barely compress, for much CPU). A checkpoint file (schema 6) holds::

    FLORCKPT | 8-byte header length | zlib(JSON header) | zlib(skeleton) | zlib(Python part) | HMAC (32) | xxh3-128 (16)

The header's ``parts`` and ``checksums`` are the lengths and hashes of the two compressed parts as
stored, ``sizes`` their lengths once inflated. Schemas 2-4 (still read) store all three uncompressed;
a header that starts with ``{`` is one of theirs.

The skeleton is the tensor tree with each tensor replaced by a reference (a pickle of containers and
plain values only, loaded by an unpickler that refuses any class; ``torch.save`` before schema 6, loaded
with ``weights_only=True``); the Python part is a
pickle of plain values (flags, small pickled groups) and references to pickled
blobs (larger groups, long lists' chunks, RNG states: an unchanged one is stored once).
The header names the hash algorithm and carries an HMAC of each pickled blob
(see signing.py; truncated to 128 bits). On load, in this order: the trailing xxh3 tells damage (a
flipped or missing byte anywhere: :class:`CorruptCheckpointError`, naming the
file); the HMAC tells whether this user wrote it (else
:class:`~flor_nb.errors.UntrustedStoreError`); only then are the parts inflated and anything unpickled.
Files are written to a temp name, flushed to disk and renamed: a checkpoint's new blobs together, with one
filesystem flush before their renames and one after (:func:`flor_nb.disk.write_all_atomic`), then its file.
``home`` may also be a URL (``s3://bucket/prefix``): then :mod:`flor_nb.objstore` reads and
writes the files and blobs (one upload per object, which S3 makes atomic).
A tensor whose bytes are all zero (Adam's state of parameters that got no
gradient, zeroed buffers) has no blob: the header lists its hash under ``zeros``
and load builds it with ``torch.zeros``; the skeleton, and so every digest, is
the same as if its bytes had been stored.
"""
from __future__ import annotations

import io
import json
import pickle
import re
import struct
import zlib
from pathlib import Path

import torch
import xxhash

from . import disk, objstore, signing
from .blob_pack import inflate as _inflate, pack as _pack, unpack as _unpack
from .pyblob_refs import pyblob_refs as _pyblob_refs
from .errors import FlorError, UntrustedStoreError
from .hashing import DEFAULT, hash_bytes, known
from .state import _raw, wait_copies
from .tensor_bytes import hash_tensor
from .trees import map_tree, sparse_back

MAGIC = b"FLORCKPT"
SCHEMA = 6
_READS = (2, 3, 4, 5, 6)
_UNSIGNED = (2, 3)  # written before checkpoints were signed: readable once the user trusts the store
_PY_BLOBS = ("py/", "leaves/")  # Python entries stored as blobs (pickled bytes)
_PY_OBJECTS = ("rng/", "nprs/", "npgen/")  # RNG states: pickled into blobs, so an unchanged one is stored once
_INLINE = 160  # a pickled entry under this many bytes stays in the file: a blob's reference and MAC cost more
_MAC_BYTES = 16  # a pickled blob's HMAC-SHA256, truncated to 128 bits
ROOTS = "__roots__"  # not a stream: the roots' order, kept with the digests
_TAG, _CHECK = 32, 16  # trailer: HMAC-SHA256, then xxh3-128 of everything before it
_HEX = re.compile(r"[0-9a-f]{16,128}")
_NOT_STREAMS = ("fchunks/",)  # tensor entries that are storage only: their list is digested as chunks/<path>
_MAX_HEADER = 64 << 20  # a compressed header inflating to more is refused (a damaged or hostile file)


class CorruptCheckpointError(FlorError):
    """A checkpoint file or blob is missing, truncated, or fails its hash check; names the file.

    ``path``: the damaged file; ``epoch``: the checkpoint's epoch when the reader knows it.
    """

    def __init__(self, message, path=None, epoch=None):
        super().__init__(message, path, epoch)
        self.path, self.epoch = path, epoch

    def __str__(self):
        return self.args[0]


def _ref(t: torch.Tensor, blobs: dict, algorithm: str) -> dict:
    raw = _raw(t)
    h = hash_bytes(raw, algorithm)
    blobs.setdefault(h, raw)
    return _ref_to(h, t)


def _ref_to(h: str, t: torch.Tensor) -> dict:
    """A tensor's place in a skeleton: its blob, dtype and shape."""
    return {"__blob__": h, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}


def _stream_digests(skeleton: dict, algorithm: str) -> dict:
    """One digest per tensor stream, from its skeleton (blob hashes, dtypes, shapes)."""
    return {key: hash_bytes(repr(value).encode(), algorithm) for key, value in skeleton.items()
            if not key.startswith(_NOT_STREAMS)}


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
    """Per-entry digests of the tensor part, equal for equal states (and to those :func:`split` makes)."""
    skeleton = {key: map_tree(v, lambda t: _ref_to(hash_tensor(t, algorithm), t))
                for key, v in tensors.items() if not key.startswith(_NOT_STREAMS)}
    return _stream_digests(skeleton, algorithm)


def split(snap: dict, algorithm: str = DEFAULT) -> tuple[dict, dict, dict, dict]:
    """Return (skeleton, python part, {hash: bytes}, {stream: digest}) for a snapshot (see state.py)."""
    wait_copies(snap)  # copies off a GPU are asynchronous: the buffers are read only once they landed
    blobs: dict = {}
    skeleton = {key: map_tree(value, lambda t: _ref(t, blobs, algorithm)) for key, value in snap["tensors"].items()}
    digests = _stream_digests(skeleton, algorithm)
    digests.update(snap.get("digests", {}))
    digests[ROOTS] = snap.get("roots", [])  # the walk order: a replay walks the same way to compare
    python = {}

    def keep(raw: bytes) -> str:  # a blob, stored once per content
        h = hash_bytes(raw, algorithm)
        blobs.setdefault(h, raw)
        return h

    for key, value in snap["python"].items():
        if key.startswith(_PY_BLOBS) and isinstance(value, bytes):
            # small ones stay in the file (its HMAC covers them): a blob's reference and MAC cost more
            python[key] = value if len(value) < _INLINE else {"__pyblob__": keep(value)}
        elif key.startswith(_PY_OBJECTS):
            raw = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
            python[key] = value if len(raw) < _INLINE else {"__pyobj__": keep(raw)}
        elif key.startswith("chunks/"):  # a long list: one blob per chunk, so unchanged chunks dedup
            python[key] = {"__pyblobs__": [keep(chunk) for chunk in value]}
        else:
            python[key] = value
    return skeleton, python, blobs, digests


def write(home: Path, rel: str, snap: dict, algorithm: str = DEFAULT, parts=None) -> dict:
    """Persist a snapshot: new blobs, then the signed checkpoint file. Returns sizes, checksum and digests.

    ``parts``: the snapshot's :func:`split`, when the caller made it already.
    """
    skeleton, python, blobs, digest = parts or split(snap, algorithm)
    tensor_blobs: dict = {}
    map_tree(skeleton, lambda r: tensor_blobs.setdefault(r["__blob__"], blobs[r["__blob__"]]), _is_ref)
    zeros = zero_blobs(tensor_blobs, algorithm)
    pyblobs = sorted(py_hashes(python))
    packable = {h: 1 for h in pyblobs} | _shuffled(skeleton)  # blob -> width of its values (1: as it is)
    stored: dict = {}  # blob -> bytes it takes in the store
    new = []
    remote = objstore.is_url(home)
    local: list = []  # (path, bytes) of the new blobs of a local store: written together, one flush
    for h, raw in blobs.items():
        if h in zeros:
            continue
        if remote:
            stored[h], created = _put_remote(home, h, raw, packable.get(h))
        else:
            path = Path(home) / "blobs" / h[:2] / h
            try:
                stored[h], created = path.stat().st_size, False
            except FileNotFoundError:
                data = _pack(raw, packable[h]) if h in packable else raw
                local.append((path, data))
                stored[h], created = len(data), True
        if created:
            new.append(h)
    if local:
        disk.write_all_atomic(local, home)
    skel = pickle.dumps(skeleton, protocol=pickle.HIGHEST_PROTOCOL)  # dicts, lists, str, int: see _skeleton
    py = pickle.dumps(python, protocol=pickle.HIGHEST_PROTOCOL)
    header = {
        "schema": SCHEMA,
        "hash": algorithm,
        "skeleton": "plain",
        "digests": digest,
        "roots": snap.get("roots", []),
        "not_captured": snap.get("not_captured", {}),
        "macs": {h: signing.mac(blobs[h], "blob")[:_MAC_BYTES].hex() for h in pyblobs},
        "zeros": sorted(zeros),
    }
    data = _seal(rel, header, skel, py)
    objstore.put(home, rel, data) if remote else disk.write_atomic(disk.inside(home, rel), data)
    return {
        "bytes": sum(stored[h] for h in new) + len(data),
        "logical_bytes": sum(len(r) for h, r in blobs.items() if h not in zeros) + len(data),
        "checksum": hash_bytes(data, algorithm),
        "digests": digest,
        "file_bytes": len(data),
        "blobs": stored,  # every blob the file refers to, with the bytes it takes stored (see _put_remote)
        "new_blobs": new,  # the blobs this write created (the others were on disk already)
        "zero_bytes": sum(len(blobs[h]) for h in zeros),
    }


def _shuffled(skeleton: dict) -> dict:
    """Tensor blobs worth compressing, with the width their bytes are shuffled by: a torch generator's state
    (``rng/torch``, ``obj/<a Generator>``: one uint8 tensor holding 624 words in 8 bytes each, half zero)
    and a history of floats (``fchunks/``; float32 from ``loss.item()`` has a near-constant exponent byte)."""
    out = {}
    for key, r in skeleton.items():
        if key.startswith(("rng/", "obj/")) and _is_ref(r) and r["dtype"] == "uint8":
            out[r["__blob__"]] = 8
        elif key.startswith("fchunks/"):
            for ref in r:
                out[ref["__blob__"]] = 4 if ref["dtype"] == "float32" else 8
    return out


def _put_remote(url, h: str, raw: bytes, pack: int | None) -> tuple[int, bool]:
    """Upload blob ``h`` (compressed when ``pack`` names a width) unless it is there: (the bytes it takes in the store,
    whether this call wrote it). A blob already there counts its raw length: its stored size would cost a
    request or compressing it again, every checkpoint, and nothing thins a remote location (record.py)."""
    rel = f"blobs/{h[:2]}/{h}"
    if objstore.exists(url, rel):
        return len(raw), False
    data = _pack(raw, pack) if pack else raw
    objstore.put(url, rel, data)
    return len(data), True


def _home(home):
    """A store folder as a Path; a URL (s3://..., file://...) as it is."""
    return home if objstore.is_url(home) else Path(home)


def _seal(rel: str, header: dict, skel: bytes, py: bytes) -> bytes:
    """The file's bytes: the body (header, skeleton and Python part, each compressed), its HMAC (bound to
    the file's place in the store), its xxh3. ``header`` gets the parts' lengths and checksums."""
    parts = [zlib.compress(skel), zlib.compress(py)]
    header = {**header, "parts": [len(p) for p in parts], "sizes": [len(skel), len(py)],
              "checksums": [hash_bytes(p, header["hash"]) for p in parts]}
    head = zlib.compress(json.dumps(header).encode())
    body = MAGIC + struct.pack("<Q", len(head)) + head + b"".join(parts)
    tag = signing.mac(body, f"checkpoint:{rel}")
    return body + tag + xxhash.xxh3_128_digest(body + tag)


def _open(home: Path, rel: str):
    """Read a checkpoint file, telling damage apart: (path, data, header, header length, body end, sealed)."""
    path = objstore.where(home, rel) if objstore.is_url(home) else disk.inside(home, rel)
    try:
        data = objstore.get(home, rel) if objstore.is_url(home) else path.read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"Checkpoint file {path} is missing. Replay other epochs or record again.",
                                     str(path)) from None
    if not data.startswith(MAGIC) or len(data) < 16:
        raise CorruptCheckpointError(f"{path} is not a flor_nb checkpoint (damaged or replaced).", str(path))
    sealed = len(data) > 16 + _TAG + _CHECK and xxhash.xxh3_128_digest(data[:-_CHECK]) == data[-_CHECK:]
    (hlen,) = struct.unpack("<Q", data[8:16])
    head = data[16:16 + hlen]
    if not head.startswith(b"{"):  # schema 5 on: compressed, so only an intact file's is inflated
        if not sealed:
            raise CorruptCheckpointError(f"Checkpoint {path} is damaged (checksum mismatch: flipped or missing "
                                         "bytes). Replay from another epoch.", str(path))
        head = _inflate(head, _MAX_HEADER)
    try:
        header = json.loads(head)
        schema = header.get("schema")
    except (TypeError, ValueError, AttributeError):
        raise CorruptCheckpointError(f"Checkpoint {path} is damaged (its header does not parse). "
                                     "Replay from another epoch.", str(path)) from None
    if schema not in _READS:
        raise CorruptCheckpointError(f"{path} has checkpoint schema {schema}; this flor_nb reads "
                                     f"{', '.join(map(str, _READS))}.", str(path))
    parts = header.get("parts")
    legacy_size = 16 + hlen + sum(parts) if isinstance(parts, list) and all(isinstance(n, int) for n in parts) else -1
    if not sealed and (schema not in _UNSIGNED or legacy_size != len(data)):
        raise CorruptCheckpointError(f"Checkpoint {path} is damaged (checksum mismatch: flipped or missing bytes). "
                                     "Replay from another epoch.", str(path))
    end = len(data) - _TAG - _CHECK if sealed else len(data)
    return path, data, header, hlen, end, sealed


def _parts(path, data, header, hlen):
    """(skeleton bytes, Python bytes, hash algorithm) as stored, checked against the header's checksums."""
    algorithms = [header["hash"]] if "hash" in header else ["xxh3_128", "blake2b_128"]  # schema 2 did not say
    if not all(known(a) for a in algorithms):
        raise CorruptCheckpointError(f"{path} was hashed with {header['hash']}, which this flor_nb does not know.",
                                     str(path))
    start = 16 + hlen
    try:
        n_skel, n_py = header["parts"]
    except (KeyError, TypeError, ValueError):
        raise CorruptCheckpointError(f"Checkpoint {path} is damaged (its header lacks its parts).", str(path)) from None
    skel, py = data[start:start + n_skel], data[start + n_skel:start + n_skel + n_py]
    algorithm = next((a for a in algorithms if [hash_bytes(skel, a), hash_bytes(py, a)] == header.get("checksums")),
                     None)
    if algorithm is None:
        raise CorruptCheckpointError(f"Checkpoint {path} is damaged (checksum mismatch). Replay from another epoch.",
                                     str(path))
    return skel, py, algorithm


def _inflated(path, header, skel: bytes, py: bytes) -> tuple[bytes, bytes]:
    """The skeleton and Python part of a checked file, inflated (schema 5 on) to the sizes its header names."""
    if header["schema"] < 5:
        return skel, py
    sizes = header.get("sizes")
    if not (isinstance(sizes, list) and len(sizes) == 2 and all(isinstance(n, int) and n >= 0 for n in sizes)):
        raise CorruptCheckpointError(f"Checkpoint {path} is damaged (its header lacks its parts' sizes).", str(path))
    out = [_inflate(part, n) for part, n in zip((skel, py), sizes)]
    if any(o is None or len(o) != n for o, n in zip(out, sizes)):
        raise CorruptCheckpointError(f"Checkpoint {path} is damaged (its parts do not inflate). "
                                     "Replay from another epoch.", str(path))
    return out[0], out[1]


def _signed(home: Path, rel: str):
    """(skeleton, Python part, hash algorithm, header) of a file that is intact and signed by this user."""
    path, data, header, hlen, end, sealed = _open(home, rel)
    skel, py, algorithm = _parts(path, data, header, hlen)  # damage first: it is named as such
    if not sealed or not signing.verify(data[:end], data[end:end + _TAG], f"checkpoint:{rel}"):
        raise UntrustedStoreError(signing.refusal(home, f"checkpoint {rel}"))
    return (*_inflated(path, header, skel, py), algorithm, header)


def read(home: Path, rel: str) -> dict:
    """Load and verify a checkpoint; return a snapshot dict (see state.py) with its ``header``.

    Nothing is unpickled before the file's HMAC, and each pickled blob's, verify with this user's key.
    """
    skel, py, algorithm, header = _signed(_home(home), rel)
    macs = header.get("macs") or {}
    skeleton = _skeleton(skel, header, rel)
    zeros = set(header.get("zeros", ()))
    cache: dict = {}

    def blob(h: str) -> bytearray:
        if h not in cache:
            cache[h] = _blob(_home(home), h, algorithm)
        return cache[h]

    def tensor(r: dict) -> torch.Tensor:
        dtype = getattr(torch, r["dtype"])
        if r["__blob__"] in zeros:
            return torch.zeros(r["shape"], dtype=dtype)
        raw = blob(r["__blob__"])
        if not raw:
            return torch.empty(r["shape"], dtype=dtype)
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(r["shape"]).clone()

    tensors = {k: sparse_back(map_tree(v, tensor, _is_ref)) for k, v in skeleton.items()}
    python = pickle.loads(py)  # signed by this user: the HMAC above verified
    for key, value in python.items():
        if isinstance(value, dict) and "__pyblob__" in value:
            python[key] = _signed_blob(blob, macs, value["__pyblob__"], home, rel)
        elif isinstance(value, dict) and "__pyobj__" in value:  # signed by this user: verified just before
            python[key] = pickle.loads(_signed_blob(blob, macs, value["__pyobj__"], home, rel))
        elif isinstance(value, dict) and "__pyblobs__" in value:
            python[key] = [_signed_blob(blob, macs, h, home, rel) for h in value["__pyblobs__"]]
    return {"tensors": tensors, "python": python, "header": header}


class _Plain(pickle.Unpickler):
    """Unpickles containers and plain values only: a skeleton names no class or function."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"a skeleton names {module}.{name}")


def _skeleton(skel: bytes, header: dict, rel: str) -> dict:
    """A checkpoint's tensor tree with references in place of tensors: a plain pickle from schema 6
    (``"skeleton": "plain"``; nothing but dicts, lists, tuples, str, numbers), ``torch.save`` before."""
    if header.get("skeleton") != "plain":
        return torch.load(io.BytesIO(skel), weights_only=True)
    try:
        return _Plain(io.BytesIO(skel)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise CorruptCheckpointError(f"Checkpoint {rel} is damaged (its tensor tree does not load: {e}). "
                                     "Replay from another epoch.", rel) from None


def _is_ref(x) -> bool:
    return isinstance(x, dict) and "__blob__" in x


def _signed_blob(blob, macs: dict, h: str, home, rel: str) -> bytes:
    """A pickled blob's bytes, once its HMAC says this user wrote it."""
    raw = bytes(blob(h))
    if not signing.verify(raw, bytes.fromhex(macs.get(h, "")), "blob"):
        raise UntrustedStoreError(signing.refusal(Path(home), f"the pickled blob {h} of checkpoint {rel}"))
    return raw


def py_hashes(python: dict) -> set:
    """The blobs a checkpoint's Python part refers to: pickled groups and the chunks of long lists."""
    found: set = set()
    for v in python.values():
        if isinstance(v, dict) and ("__pyblob__" in v or "__pyobj__" in v):
            found.add(v.get("__pyblob__") or v["__pyobj__"])
        elif isinstance(v, dict) and "__pyblobs__" in v:
            found.update(v["__pyblobs__"])
    return found


def verify(home: Path, rel: str) -> None:
    """Check a checkpoint file and every blob it names, unpickling no object (the skeleton is plain
    containers); raise what :func:`read` would."""
    skel, _, algorithm, header = _signed(_home(home), rel)
    refs: set = set()
    for tree in _skeleton(skel, header, rel).values():
        map_tree(tree, lambda r: refs.add(r["__blob__"]), _is_ref)
    for h in sorted((refs - set(header.get("zeros", ()))) | set(header.get("macs") or {})):
        _blob(_home(home), h, algorithm)


def resign(home: Path, rel: str) -> None:
    """Sign a checkpoint file and its pickled blobs with this user's key (see :func:`flor_nb.trust`).

    Damaged files and blobs are refused (:class:`CorruptCheckpointError`); nothing is unpickled.
    Files of older schemas are rewritten in the current one.
    """
    path, data, header, hlen, end, _ = _open(Path(home), rel)
    skel, py, algorithm = _parts(path, data, header, hlen)
    skel, py = _inflated(path, header, skel, py)
    pyblobs = header["macs"] if header.get("schema") >= 4 and "macs" in header else _pyblob_refs(py)
    header = {**header, "schema": SCHEMA, "hash": algorithm,
              "macs": {h: signing.mac(_blob(Path(home), h, algorithm), "blob")[:_MAC_BYTES].hex()
                       for h in sorted(pyblobs)}}
    disk.write_atomic(path, _seal(rel, header, skel, py))


def _blob(home, h: str, algorithm: str) -> bytearray:
    """The bytes whose hash is ``h``: a blob as stored, or (a compressed pickled blob) inflated."""
    if not isinstance(h, str) or not _HEX.fullmatch(h):
        raise CorruptCheckpointError(f"A checkpoint in {home} names the blob {h!r}, which is not a blob hash.")
    remote = objstore.is_url(home)
    path = objstore.where(home, f"blobs/{h[:2]}/{h}") if remote else Path(home) / "blobs" / h[:2] / h
    try:
        raw = bytearray(objstore.get(home, f"blobs/{h[:2]}/{h}") if remote else path.read_bytes())
    except FileNotFoundError:
        raise CorruptCheckpointError(f"Blob {path} is missing. Replay other epochs or record again.",
                                     str(path)) from None
    if hash_bytes(raw, algorithm) == h:
        return raw
    out = _unpack(raw)
    if out is not None and hash_bytes(out, algorithm) == h:
        return bytearray(out)
    raise CorruptCheckpointError(f"Blob {path} is damaged (hash mismatch). Replay other epochs.", str(path))


def references(home: Path, rel: str) -> set[str]:
    """The blobs a checkpoint file refers to (tensors and pickled Python parts), unpickling no object.

    Raises :class:`CorruptCheckpointError` when the file is missing or damaged: a caller that
    frees space must then keep every blob (it cannot tell which ones the file needs).
    """
    path, data, header, hlen, _, _ = _open(_home(home), rel)
    skel, py, _ = _parts(path, data, header, hlen)
    skel, py = _inflated(path, header, skel, py)
    found: set[str] = set()
    for tree in _skeleton(skel, header, rel).values():
        map_tree(tree, lambda r: found.add(r["__blob__"]), _is_ref)
    found.update(header["macs"] if "macs" in header else _pyblob_refs(py))
    return found - set(header.get("zeros", ()))


def blob_path(home: Path, h: str) -> Path:
    """Where blob ``h`` lives in a store."""
    return Path(home) / "blobs" / h[:2] / h
