"""Say when training changes a DataLoader's or Dataset's data, which a replay does not restore.

A replay rebuilds the state's DataLoaders and Datasets by running their cells again (their generators and
samplers are restored; see ``capture._data``), so a replayed epoch reads the data as the cell made it. A
training loop that appends samples (a growing replay buffer, pseudo-labels added to the set) or relabels them
in place would leave later epochs reading other data in a replay. The recorder compares, at each unit's end,
what such an object holds against what it held when recording started: the dataset's length; for
tensors it holds (a ``TensorDataset``, a ``Subset``'s indices), their in-place version counters; and, where that
takes under a millisecond or two, the items of the Python lists and numpy arrays it holds (CIFAR10's ``targets``
list, relabelled in place by a pseudo-labelling loop). One that changed is named as not captured, when it
changes. Larger lists and arrays (CIFAR10's images) are watched by their length only, and the recording notes it.

Functions the cell calls are code, rebuilt too; one whose closure holds a variable training changes (a warmup
counter behind ``nonlocal n``, a dict it updates) would start it afresh in a replay. Their closure variables are
digested the same way (the state's objects by name) and one that changed is named.
"""
from __future__ import annotations

import time
import types

import numpy as np
import torch
import xxhash

from .capture import state_objects
from .setup_check import closure_values, digest

_DATA = (torch.utils.data.DataLoader, torch.utils.data.Dataset)


def signature(obj) -> tuple:
    """(length, tensor versions) of what a DataLoader (its dataset) or a Dataset holds."""
    ds = obj.dataset if isinstance(obj, torch.utils.data.DataLoader) else obj
    try:
        n = len(ds)
    except Exception:  # noqa: BLE001 - an iterable dataset: no length to watch
        n = None
    versions = []
    for d in _levels(obj):  # a Subset of a Subset of a TensorDataset
        for v in (list(getattr(d, "tensors", None) or ()) + [getattr(d, "indices", None)]):
            if isinstance(v, torch.Tensor):
                versions.append(v._version)
            elif isinstance(v, list):
                versions.append(len(v))
    return n, tuple(versions)


CONTENT_BUDGET_S = 0.002  # per data object and unit boundary: the items of its lists and arrays, if this cheap
_MAX_BYTES = 8 << 20  # a numpy array larger than this is watched by its shape only (xxh3: ~1 ms for 8 MB)
_MAX_ITEMS = 200_000  # a list longer than this by its length only


def _levels(obj):
    """A DataLoader's dataset, a Dataset, and the datasets they wrap (a few levels, not a walk)."""
    ds = obj.dataset if isinstance(obj, torch.utils.data.DataLoader) else obj
    seen, stack = set(), [ds]
    while stack and len(seen) < 16:
        d = stack.pop()
        if id(d) in seen:
            continue
        seen.add(id(d))
        yield d
        inner = getattr(d, "dataset", None)
        if isinstance(inner, torch.utils.data.Dataset):
            stack.append(inner)


def content(obj) -> tuple[tuple, list]:
    """What the lists and numpy arrays a data object's datasets hold as attributes contain: a hash of their items
    (within this process: Python's ``hash`` of a list of labels, paths or (path, label) pairs; xxh3 of an array's
    bytes), a list of unhashable items (rows as lists) by its length; and the attributes too large to hash at
    every unit's end (CIFAR10's 150 MB of images: its ``targets`` are still watched)."""
    out, skipped = [], []
    for d in _levels(obj):
        for name, v in sorted(vars(d).items()) if hasattr(d, "__dict__") else ():
            if isinstance(v, list):
                if len(v) > _MAX_ITEMS:
                    skipped.append(name)
                    continue
                try:
                    out.append((name, len(v), hash(tuple(v))))
                except TypeError:
                    out.append((name, len(v)))
            elif isinstance(v, np.ndarray) and not v.dtype.hasobject:
                if v.nbytes > _MAX_BYTES:
                    skipped.append(name)
                    continue
                out.append((name, v.shape, xxhash.xxh3_64_intdigest(np.ascontiguousarray(v).data)))
    return tuple(out), skipped


class Watch:
    """The state's data objects (top-level names) and what they held when recording started."""

    def __init__(self, ns: dict, roots):
        self._objects = {n: ns[n] for n in sorted(roots) if isinstance(ns.get(n), _DATA)}
        self._start = {n: signature(o) for n, o in self._objects.items()}
        self._content, self.too_large = {}, []  # names whose items are watched; those too large to watch
        for n, o in self._objects.items():
            t = time.perf_counter()
            try:
                was, skipped = content(o)
            except Exception:  # noqa: BLE001 - a dataset whose attributes cannot be read: length and versions only
                continue
            if time.perf_counter() - t <= CONTENT_BUDGET_S:
                self._content[n] = was
            if skipped or n not in self._content and was:
                self.too_large.append(n)
        self._told: set = set()
        self._closures = {n: ns[n] for n in sorted(roots)
                          if isinstance(ns.get(n), types.FunctionType) and ns[n].__closure__}
        # the state's objects (``params = list(model.parameters())`` too) by name: captured on their own
        self._graph, self._named = state_objects(ns, roots) if self._closures else (None, {})
        self._held = {n: self._cells(f) for n, f in self._closures.items()}

    def _cells(self, fn) -> list | None:
        """The digest of each closure variable of ``fn`` (None: too large to digest in 50 ms)."""
        deadline = time.perf_counter() + 0.05
        out = [digest(value, deadline, named=self._named) for value in closure_values(fn)]
        return None if None in out else out

    def notes(self) -> dict:
        """{name: how it is watched} for the data objects whose items are not compared (kept with the run)."""
        return {n: "a DataLoader or Dataset whose lists and arrays are too large to compare item by item at each "
                   "unit's end: a change of their items by training is not seen (their length and tensors' versions "
                   "are)" for n in self.too_large}

    def changed(self, unit: int, word: str = "epoch") -> dict:
        """{name: why} for those first seen changed at the end of ``unit``."""
        out = {}
        for name, obj in self._objects.items():
            if name in self._told:
                continue
            now = signature(obj)
            items = name in self._content and content(obj)[0] != self._content[name]
            if now != self._start[name] or items:
                self._told.add(name)
                (n0, _), (n1, _) = self._start[name], now
                how = f"its length went from {n0} to {n1}" if n0 != n1 else \
                    "a tensor it holds was changed in place" if now != self._start[name] else \
                    "items of a list or array it holds were replaced in place"
                out[name] = (f"{type(obj).__name__} changed by training ({how} by the end of {word} {unit}); a replay "
                             f"rebuilds it as its cell made it, so replayed {word}s after {unit} read other data")
        for name, fn in self._closures.items():
            was = self._held[name]
            if name in self._told or was is None:
                continue
            now = self._cells(fn)
            moved = [v for v, a, b in zip(fn.__code__.co_freevars, was, now or was) if a != b]
            if moved:
                self._told.add(name)
                it = "it" if len(moved) == 1 else "them"
                plural = "s" if len(moved) > 1 else ""
                out[name] = (f"function {name}() changed by training: its closure variable{plural} {', '.join(moved)} "
                             f"(by the end of {word} {unit}) cannot be restored; a replay starts {it} as the cells "
                             f"made {it}, so replayed {word}s after {unit} may differ. Keep such state in an object "
                             "or a global the cell reads")
        return out
