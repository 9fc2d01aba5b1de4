"""The blobs a checkpoint's Python part refers to, for files written before checkpoints listed them (schemas 2-3,
unsigned): read from the pickle's opcodes, nothing executed, so a store can be trusted (resigned) and garbage
collected without unpickling what it holds.
"""
from __future__ import annotations

import pickletools


def pyblob_refs(py: bytes) -> set:
    """The blob hashes an unsigned Python part refers to, read from its opcodes (nothing is executed)."""
    memo: dict = {}
    refs, last, key_seen, in_list = set(), None, False, False
    for op, arg, _ in pickletools.genops(py):
        if in_list:  # the hashes of a long list's chunks, after "__pyblobs__"
            if op.name in ("APPENDS", "APPEND") or op.name.startswith("STOP"):
                in_list = False
            elif isinstance(arg, str) and "UNICODE" in op.name:
                refs.add(arg)
            continue
        if op.name in ("MEMOIZE",):
            memo[len(memo)] = last
            continue
        if op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = last
            continue
        if op.name in ("BINGET", "LONG_BINGET", "GET"):
            value = memo.get(int(arg))
        elif isinstance(arg, str) and "UNICODE" in op.name:
            value = arg
        else:
            last, key_seen = None, False
            continue
        if key_seen and isinstance(value, str):
            refs.add(value)
        key_seen = value in ("__pyblob__", "__pyobj__")
        in_list = value == "__pyblobs__"
        last = value
    return refs
