"""State-dict trees: nested dicts, lists and tuples with tensors (and other values) at the leaves."""
from __future__ import annotations

from collections import OrderedDict

import torch

# Leaves a checkpoint's tensor part may hold and still load with ``torch.load(weights_only=True)``.
PLAIN = (int, float, bool, str, type(None))


SPARSE = "__sparse_coo__"  # a sparse COO tensor in a snapshot: its dense parts, so they are hashed and stored
COMPRESSED = "__sparse_compressed__"  # a CSR, CSC, BSR or BSC tensor: its layout's name, with its dense parts
_LAYOUTS = {torch.sparse_csr: ("csr", "crow_indices", "col_indices"),
            torch.sparse_csc: ("csc", "ccol_indices", "row_indices"),
            torch.sparse_bsr: ("bsr", "crow_indices", "col_indices"),
            torch.sparse_bsc: ("bsc", "ccol_indices", "row_indices")}
_BY_NAME = {name: layout for layout, (name, _, _) in _LAYOUTS.items()}


def dense_leaf(t: torch.Tensor, fn):
    """``fn(t)``, or for a sparse tensor a dict of ``fn`` of its dense parts (:func:`sparse_back` rebuilds it):
    a COO tensor (``nn.Embedding(sparse=True)``'s gradients) gives its indices and values, its size and
    whether it is coalesced; a compressed one (CSR, CSC, BSR, BSC: an adjacency matrix) its layout, its
    compressed and plain indices, its values and its size."""
    if t.layout == torch.strided:
        return fn(t)
    if t.layout == torch.sparse_coo:
        return {SPARSE: t.is_coalesced(), "indices": fn(t._indices()), "values": fn(t._values()),
                "size": list(t.shape)}
    if t.layout in _LAYOUTS:
        name, compressed, plain = _LAYOUTS[t.layout]
        return {COMPRESSED: name, "compressed": fn(getattr(t, compressed)()), "plain": fn(getattr(t, plain)()),
                "values": fn(t.values()), "size": list(t.shape)}
    return fn(t)


def sparse_back(tree):
    """A snapshot tree with the sparse tensors :func:`dense_leaf` took apart put back together."""
    return map_tree(tree, _sparse, lambda x: isinstance(x, dict) and "values" in x and (SPARSE in x or COMPRESSED in x))


def _sparse(parts: dict) -> torch.Tensor:
    if COMPRESSED in parts:
        return torch.sparse_compressed_tensor(parts["compressed"], parts["plain"], parts["values"], parts["size"],
                                              layout=_BY_NAME[parts[COMPRESSED]], check_invariants=True)
    return torch.sparse_coo_tensor(parts["indices"], parts["values"], parts["size"],
                                   is_coalesced=bool(parts[SPARSE]), check_invariants=True)


def map_tree(tree, fn, is_leaf=lambda x: isinstance(x, torch.Tensor)):
    """Apply ``fn`` to every leaf (default: tensor) of a tree of dicts, lists, tuples; copy the tree."""
    if is_leaf(tree):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: map_tree(v, fn, is_leaf) for k, v in tree.items()}
    if isinstance(tree, list):
        return [map_tree(v, fn, is_leaf) for v in tree]
    if isinstance(tree, tuple):
        return tuple(map_tree(v, fn, is_leaf) for v in tree)
    return tree


def split_leaves(tree) -> tuple[object, list]:
    """Move leaves that are neither tensors nor plain values (numpy scalars, arrays, objects) out of ``tree``.

    Returns the tree with ``{"__leaf__": i}`` in their place, and the leaves. The tree then loads with
    ``weights_only=True``; the leaves go with the pickled part of a checkpoint.
    """
    leaves: list = []

    def walk(x):
        t = type(x)
        if t in PLAIN or isinstance(x, torch.Tensor):
            return x
        if (t is dict or t is OrderedDict) and all(type(k) in PLAIN for k in x):
            return {k: walk(v) for k, v in x.items()}
        if t is list:
            return [walk(v) for v in x]
        if t is tuple:
            return tuple(walk(v) for v in x)
        leaves.append(x)
        return {"__leaf__": len(leaves) - 1}

    return walk(tree), leaves


def put_leaves(tree, leaves: list):
    """Undo :func:`split_leaves`."""
    if not leaves:
        return tree
    return map_tree(tree, lambda r: leaves[r["__leaf__"]], lambda x: isinstance(x, dict) and "__leaf__" in x)
