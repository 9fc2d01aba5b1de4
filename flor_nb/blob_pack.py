"""How blobs are stored compressed: ``FLZ1 | length | zlib(bytes)``, or, for tensors of fixed-width values (a torch
generator's state, a history of floats), ``FLZ2 | length | width | zlib(bytes shuffled by width)``: byte k of every
value first, for each k, so exponents and zero halves sit together. A blob that would not shrink by a tenth is
stored raw. Reading refuses a stream that is damaged, inflates past its stated length, or has bytes after it.
"""
from __future__ import annotations

import struct
import zlib

_PACKED = b"FLZ1"  # a compressed pickled blob: FLZ1 | 8-byte little-endian uncompressed length | zlib data
_SHUFFLED = b"FLZ2"  # a compressed tensor blob: FLZ2 | 8-byte length | 1-byte width | zlib(bytes shuffled)


def pack(raw: bytes, width: int = 1) -> bytes:
    """A blob as stored: compressed where that saves a tenth, else raw. ``FLZ1 | length | zlib(bytes)``,
    or with ``width`` > 1 ``FLZ2 | length | width | zlib(bytes shuffled)``: byte k of every value first, for
    each k, so the bytes that barely change (exponents, zero halves) sit together and compress."""
    if width > 1 and len(raw) % width == 0:
        data = bytes(raw)
        shuffled = b"".join(data[k::width] for k in range(width))
        packed = _SHUFFLED + struct.pack("<QB", len(raw), width) + zlib.compress(shuffled)
    else:
        packed = _PACKED + struct.pack("<Q", len(raw)) + zlib.compress(raw)
    return raw if len(packed) > 0.9 * len(raw) else packed


def unpack(raw) -> bytes | None:
    """A blob's bytes from their stored form (:func:`pack`); None when it is not packed or is damaged."""
    if raw.startswith(_PACKED) and len(raw) >= len(_PACKED) + 8:
        (size,) = struct.unpack("<Q", raw[4:12])
        out = inflate(memoryview(raw)[12:], size)
        return out if out is not None and len(out) == size else None
    if raw.startswith(_SHUFFLED) and len(raw) >= len(_SHUFFLED) + 9:
        size, width = struct.unpack("<QB", raw[4:13])
        out = inflate(memoryview(raw)[13:], size)
        if out is None or len(out) != size or not width or size % width:
            return None
        n = size // width
        whole = bytearray(size)
        for k in range(width):
            whole[k::width] = out[k * n:(k + 1) * n]
        return bytes(whole)
    return None


def inflate(data, most: int) -> bytes | None:
    """The one zlib stream ``data`` holds, inflated; None when it is damaged, inflates to more than
    ``most`` bytes, or is followed by anything."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, most + 1)
    except (zlib.error, OverflowError):
        return None
    return out if d.eof and not d.unused_data and len(out) <= most else None
