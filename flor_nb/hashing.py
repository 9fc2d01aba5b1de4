"""Content hashes, named: every checkpoint records the algorithm it was written with.

xxh3-128 (the ``xxhash`` package, a declared dependency) hashes at ~30 GB/s;
blake2b-128 is what checkpoints of an older flor_nb used where xxhash was not
installed, so a store written then still verifies.
"""
from __future__ import annotations

import hashlib

import xxhash

DEFAULT = "xxh3_128"


def _blake2b(data=b""):
    return hashlib.blake2b(data, digest_size=16)


_NEW = {"xxh3_128": xxhash.xxh3_128, "blake2b_128": _blake2b}


def new_hasher(algorithm: str = DEFAULT):
    """A streaming hasher (``update``, ``hexdigest``)."""
    return _NEW[algorithm]()


def hash_bytes(data, algorithm: str = DEFAULT) -> str:
    if algorithm == "xxh3_128":
        return xxhash.xxh3_128_hexdigest(data)
    return _NEW[algorithm](data).hexdigest()


def known(algorithm: str) -> bool:
    return algorithm in _NEW
