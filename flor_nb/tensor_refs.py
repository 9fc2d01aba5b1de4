"""After the capture walk: which tensors are references to live state (parameters and buffers of captured
modules, views of them, optimizer state) rather than values of their own."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .paths import attr_path

if TYPE_CHECKING:
    from .capture import Graph


def classify_tensors(g: Graph, params: dict):
    """Tensors that are parameters or buffers of a captured module are references; others are values."""
    for store in (g.tensors, g.big):
        for path in list(store):
            t = store[path]
            if id(t) in params:
                del store[path]
                g.refs[id(t)] = ("param", params[id(t)])
    for path, t in g.big.items():
        g.refs[id(t)] = ("big", path)
    for pid, ppath in params.items():
        g.refs[pid] = ("param", ppath)
    _find_aliases(g, params)
    # Parameters an optimizer updates but no captured name reaches: capture them through the optimizer.
    for path, (kind, opt) in list(g.stateful.items()):
        if kind != "optimizer":
            continue
        for gi, group in enumerate(opt.param_groups):
            for pi, p in enumerate(group["params"]):
                if id(p) not in g.refs:
                    ppath = f"{path}.param_groups[{gi}]['params'][{pi}]"
                    g.tensors[ppath] = p
                    g.refs[id(p)] = ("val", ppath)


def _storage(t) -> int | None:
    try:
        return t.untyped_storage().data_ptr() if t.layout == torch.strided and t.numel() else None
    except (RuntimeError, NotImplementedError):
        return None


def _find_aliases(g: Graph, params: dict):
    """Tensors held by value that share storage with a parameter, buffer or gradient of a captured module:
    ``best = model.state_dict()`` (no copy) keeps changing as the model trains, so restore must make it a
    view of the restored parameter again, not an independent copy."""
    if not g.tensors:
        return
    bases: dict = {}
    for path, (kind, obj) in g.stateful.items():
        if kind != "module":
            continue
        for name, t in list(obj.named_parameters()) + list(obj.named_buffers()):
            full = attr_path(path, name)
            for base_path, base in ((full, t), (f"{full}.grad", getattr(t, "grad", None))):
                ptr = _storage(base) if isinstance(base, torch.Tensor) else None
                if ptr is not None:
                    bases.setdefault((ptr, base.dtype, base.device), base_path)
    for path, t in g.tensors.items():
        ptr = _storage(t)
        base = bases.get((ptr, t.dtype, t.device)) if ptr is not None else None
        if base is not None:
            g.aliases[path] = (base, t.storage_offset(), list(t.shape), list(t.stride()))


def optimizer_state_refs(g: Graph, seen: dict):
    """``checkpoint = {"optimizer": opt.state_dict()}`` holds the optimizer's own per-parameter state dicts
    (and their tensors), which keep changing as it steps: they are references to the live optimizer's state,
    restored as such, not copies."""
    for path, (kind, opt) in g.stateful.items():
        if kind != "optimizer":
            continue
        for gi, group in enumerate(opt.param_groups):
            for pi, p in enumerate(group["params"]):
                st = opt.state.get(p)
                if not isinstance(st, dict):
                    continue
                if id(st) in seen:
                    g.identity[id(st)] = g.refs[id(st)] = ("optstate", f"{path}|{gi}|{pi}|")
                for key, v in st.items():
                    if isinstance(v, torch.Tensor) and id(v) in seen and isinstance(key, str):
                        g.refs[id(v)] = ("optstate", f"{path}|{gi}|{pi}|{key}")
                        for store in (g.tensors, g.big):
                            for tp in [tp for tp, t in store.items() if t is v]:
                                del store[tp]
