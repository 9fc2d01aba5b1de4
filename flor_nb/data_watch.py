"""Say when training changes a DataLoader's or Dataset's data, which a replay does not restore.

A replay rebuilds the state's DataLoaders and Datasets by running their cells again (their generators and
samplers are restored; see ``capture._data``), so a replayed epoch reads the data as the cell made it. A
training loop that appends samples (a growing replay buffer, pseudo-labels added to the set) or relabels them
in place would leave later epochs reading other data in a replay. The recorder compares, at each unit's end,
what such an object holds against what it held when recording started: the dataset's length and, for
tensors it holds (a ``TensorDataset``, a ``Subset``'s indices), their in-place version counters. One that
changed is named as not captured, when it changes. Items of a Python list replaced in place are not seen.
"""
from __future__ import annotations

import torch

_DATA = (torch.utils.data.DataLoader, torch.utils.data.Dataset)


def signature(obj) -> tuple:
    """(length, tensor versions) of what a DataLoader (its dataset) or a Dataset holds."""
    ds = obj.dataset if isinstance(obj, torch.utils.data.DataLoader) else obj
    try:
        n = len(ds)
    except Exception:  # noqa: BLE001 - an iterable dataset: no length to watch
        n = None
    versions, seen, stack = [], set(), [ds]
    while stack and len(seen) < 16:  # a Subset of a Subset of a TensorDataset: a few levels, not a walk
        d = stack.pop()
        if id(d) in seen:
            continue
        seen.add(id(d))
        for v in (list(getattr(d, "tensors", None) or ()) + [getattr(d, "indices", None)]):
            if isinstance(v, torch.Tensor):
                versions.append(v._version)
            elif isinstance(v, list):
                versions.append(len(v))
        inner = getattr(d, "dataset", None)
        if isinstance(inner, torch.utils.data.Dataset):
            stack.append(inner)
    return n, tuple(versions)


class Watch:
    """The state's data objects (top-level names) and what they held when recording started."""

    def __init__(self, ns: dict, roots):
        self._objects = {n: ns[n] for n in sorted(roots) if isinstance(ns.get(n), _DATA)}
        self._start = {n: signature(o) for n, o in self._objects.items()}
        self._told: set = set()

    def changed(self, unit: int, word: str = "epoch") -> dict:
        """{name: why} for those first seen changed at the end of ``unit``."""
        out = {}
        for name, obj in self._objects.items():
            if name in self._told:
                continue
            now = signature(obj)
            if now != self._start[name]:
                self._told.add(name)
                (n0, _), (n1, _) = self._start[name], now
                how = f"its length went from {n0} to {n1}" if n0 != n1 else "a tensor it holds was changed in place"
                out[name] = (f"{type(obj).__name__} changed by training ({how} by the end of {word} {unit}); a replay "
                             f"rebuilds it as its cell made it, so replayed {word}s after {unit} read other data")
        return out
