"""Canonical digests of Python values: equal for equal states, in any process.

Pickle bytes are not canonical: a set of strings iterates in a different order
in another process (string hashing is randomized per process), and memo
numbering shifts with unrelated objects. This encoder walks the value itself:
sets are sorted by their elements' digests, floats are hashed by their bits,
dict keys are sorted (their order is not compared), shared references to
mutable objects and cycles are encoded as back-references (so a broken
``log["hist"] is hist`` shows; two equal tuples are one value, shared or not),
and objects captured elsewhere (modules,
tensors, optimizers) are encoded by their token, their content being digested
as their own stream.
"""
from __future__ import annotations

import struct
from array import array
from itertools import chain

import numpy as np

from .clock import CLOCK
from .hashing import new_hasher

_PACK = {float: ("d", b"Lf"), int: ("q", b"Li")}
_ROWS_MIN = 64  # with ``rows``: lists of at least this many rows of numbers are packed (see _Encoder._rows)
_ROWS_MAX = 1 << 22  # and of at most this many numbers in all (a 32 MB copy, about 0.1 s)


class _Encoder:
    def __init__(self, token, skip=None, rows=None):
        self.token, self.skip, self.rows = token, skip, rows
        self.memo: dict[int, int] = {}
        self.keep: list = []

    def encode(self, x, h):
        t = type(x)
        if t is float:
            h.update(b"f" + struct.pack("<d", x))
            return
        if t is int or t is bool:
            h.update(b"i%d;" % x if t is int else (b"T" if x else b"F"))
            return
        if t is str:
            b = x.encode("utf-8", "surrogatepass")
            h.update(b"s%d:" % len(b) + b)
            return
        if x is None:
            h.update(b"N")
            return
        if t is bytes:
            h.update(b"b%d:" % len(x) + x)
            return
        tok = self.token(x)
        if tok is not None:
            h.update(b"R" + repr(tok).encode() + b";")
            return
        if isinstance(x, np.generic):
            h.update(b"g" + str(x.dtype).encode() + b":" + x.tobytes())
            return
        if t is np.ndarray and not x.dtype.hasobject:  # an RNG's key, a small array inside a value
            h.update(b"A" + f"{x.dtype.str}{x.shape}".encode() + np.ascontiguousarray(x).tobytes())
            return
        if t is not tuple and t is not frozenset:  # sharing matters for what can change, not for values
            if id(x) in self.memo:  # a shared reference or a cycle: where it was first seen
                h.update(b"@%d;" % self.memo[id(x)])
                return
            self.memo[id(x)] = len(self.memo)
            self.keep.append(x)
        if t is list or t is tuple:
            self._sequence(x, b"l" if t is list else b"t", h)
        elif t is dict:
            self._mapping(x, b"d", h)
        elif t is set or t is frozenset:
            parts = sorted(fingerprint(v, self.token, self.skip, self.rows).encode() for v in x)
            h.update(b"S%d:" % len(parts) + b"".join(parts))
        else:
            self._object(x, h)

    def _sequence(self, x, tag, h):
        kinds = set(map(type, x))
        if self.rows is not None and len(x) > _ROWS_MIN and kinds in ({list}, {tuple}) and self._rows(x, tag, h):
            return
        if len(kinds) == 1 and len(x) > 8:
            (kind,) = kinds
            if kind in _PACK:
                code, mark = _PACK[kind]
                try:
                    h.update(tag + mark + b"%d:" % len(x) + array(code, x).tobytes())
                    return
                except OverflowError:
                    pass
        h.update(tag + b"%d:" % len(x))
        for v in x:
            self.encode(v, h)

    def _rows(self, x, tag, h) -> bool:
        """A long list of short rows of one kind of number (a dataset's 20k contexts, built in Python), at C speed:
        the rows' lengths and their numbers packed; rows shared or aliased are not told apart from copies. False
        (nothing written) for anything else."""
        if sum(map(len, x)) > _ROWS_MAX:  # a tokenized corpus: not copied here; the walk's deadline decides
            return False
        flat = list(chain.from_iterable(x))
        kinds = set(map(type, flat))
        if len(kinds) != 1 or next(iter(kinds)) not in _PACK or not self.rows.keys().isdisjoint(map(id, x)):
            return False  # not numbers of one kind, or a row is an object token() names
        code, mark = _PACK[next(iter(kinds))]
        try:
            values = array(code, flat).tobytes()
        except OverflowError:
            return False
        inner = b"l" if type(x[0]) is list else b"t"
        h.update(tag + b"R" + inner + mark + b"%d:" % len(x) + array("q", map(len, x)).tobytes() + values)
        return True

    def _mapping(self, x, tag, h):
        # Key order is not compared: restoring an optimizer rebuilds its param-group dicts in another order.
        h.update(tag + b"%d:" % len(x))
        items = []
        for k, v in x.items():
            hk = new_hasher()
            self.encode(k, hk)
            items.append((hk.hexdigest(), v))
        for hk, v in sorted(items, key=lambda kv: kv[0]):
            h.update(hk.encode())
            self.encode(v, h)

    def _object(self, x, h):
        t = type(x)
        h.update(b"o" + f"{t.__module__}.{t.__qualname__}".encode() + b":")
        if isinstance(x, (list, tuple)):  # subclasses: namedtuples, user lists
            self._sequence(list(x), b"l", h)
        if isinstance(x, dict):
            self._mapping(x, b"d", h)
        try:
            reduced = x.__reduce_ex__(4)
        except Exception as e:  # noqa: BLE001 - such a value is reported as not captured elsewhere
            h.update(b"?" + type(e).__name__.encode())
            return
        if isinstance(reduced, str):  # a global (an enum member, a singleton)
            h.update(b"G" + reduced.encode())
            return
        # (callable, args, state, listitems, dictitems): the callable by name, the rest by value.
        func, args, *rest = reduced + (None,) * (5 - len(reduced))
        h.update(b"F" + f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', repr(func))}".encode())
        self.encode(tuple(a if not isinstance(a, type) else f"{a.__module__}.{a.__qualname__}" for a in args or ()), h)
        state = rest[0]
        if isinstance(state, dict) and self.skip is not None:
            clock = self.skip(t)  # attributes its methods set from the wall clock: present, not compared
            if clock:
                state = {k: CLOCK if k in clock else v for k, v in state.items()}
        if isinstance(state, dict):
            self._mapping(state, b"D", h)
        elif state is not None:
            self.encode(state, h)


def fingerprint(value, token=lambda obj: None, skip=None, rows=None) -> str:
    """A hex digest of ``value``. ``token(obj)`` names objects captured on their own (else None);
    ``skip(type)`` names attributes of that type's objects that hold wall-clock values (clock.ClockAttrs);
    ``rows``: when given ({id: ...} of the lists ``token`` names), long lists of short rows of
    numbers are digested at C speed (another digest than without)."""
    h = new_hasher()
    _Encoder(token, skip, rows).encode(value, h)
    return h.hexdigest()
