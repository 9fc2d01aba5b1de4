"""Putting a snapshot (see state.py) back into the namespace it was taken from, or a replay's.

Tensors go back in place where a live one of the same shape, dtype and device exists; modules,
optimizers and other stateful objects load their state dicts; pickled roots are merged into the
live objects; RNG states and determinism settings are set last.
"""
from __future__ import annotations

import itertools
import logging
import pickle
import random

import numpy as np
import torch

from . import devices, frameworks, pickling
from .errors import FlorError
from .paths import resolve
from .pickling import KEEP, MISSING
from .tensor_bytes import content_hash
from .trees import put_leaves

logger = logging.getLogger(__name__)


class RestoreError(FlorError):
    """A checkpoint cannot be put back into the replay's namespace."""


class Restorer:
    """The restore half of :class:`~flor_nb.state.Capturer` (which sets the attributes used here)."""

    # -- restore -------------------------------------------------------------------------
    def restore(self, snap: dict) -> list[str]:
        """Put a snapshot back into the namespace; returns problems found (a big value that differs)."""
        ns, tensors, python = self.ns, snap["tensors"], snap["python"]
        if "vmeta" not in python:
            return _restore_legacy(ns, snap)
        resolved: dict = {}
        memo: dict = {}  # for merge(): objects that tokens resolve to are live already, taken as they are

        def live(path):
            try:
                return resolve(ns, path)
            except LookupError:
                return MISSING

        referenced: dict = {}  # id -> live object a token resolved to: merged as itself, never walked into
        for path, (seed, n) in python.get("iters", {}).items():
            it = live(path)
            why = advance(it, path, seed, n)
            if why:  # its digest ("iters") then differs at the next check, which names it
                logger.info("flor_nb: %s", why)
            elif it is not MISSING:
                self.advanced.add(path)  # a verdict that diverges names it as a possible cause
        problems = []

        def token(kind, path):
            obj = _token(kind, path)
            if obj is not KEEP and obj is not MISSING:
                memo[id(obj)] = (obj, obj)
                referenced[id(obj)] = obj
            return obj

        def _token(kind, path):
            key = (kind, path)
            if key in resolved:
                return resolved[key]
            if kind == "keep":
                return KEEP
            if kind == "global":
                obj = live(path)
                if obj is MISSING:
                    raise RestoreError(f"{path} is not defined in the replay: the recorded cells defined it. "
                                       "Keep its definition in the cells the run depends on.")
                return obj
            if kind == "optstate":  # the restored optimizer's own state dict (or a tensor in it)
                opt_path, gi, pi, key = path.split("|")
                opt = live(opt_path)
                st = opt.state.get(opt.param_groups[int(gi)]["params"][int(pi)]) if opt is not MISSING else None
                if st is None:
                    return KEEP
                return st if not key else st.get(key, KEEP)
            obj = live(path)
            return KEEP if obj is MISSING else obj

        def leaves_of(path):
            data = python.get(f"leaves/{path}")
            return pickling.loads(data, token) if data is not None else []

        for key, chunks in python.items():
            if key.startswith("chunks/"):
                resolved[("chunks", key[7:])] = list(itertools.chain.from_iterable(pickle.loads(c) for c in chunks))
        for key, chunks in tensors.items():  # a history of floats: float32 ones widen exactly
            if key.startswith("fchunks/"):
                resolved[("chunks", key[8:])] = list(itertools.chain.from_iterable(t.tolist() for t in chunks))
        meta = python["vmeta"]
        aliases = python.get("aliases", {})
        self.placed = placed = python.get("devices") or {}
        used: set = set()
        for key, value in tensors.items():  # tensors held by value, in place where they already exist
            kind, _, path = key.partition("/")
            if kind == "val":
                dev = self.device_map.device(placed.get(key, "cpu"))  # recorded there (or where the map says)
                value = devices.move(value, dev)
                grad = tensors.get(f"valgrad/{path}")
                grad = None if grad is None else devices.move(grad, self.device_map.device(
                    placed.get(f"valgrad/{path}", "cpu")))
            if kind == "val" and path in aliases and _alias(live, aliases[path], value) is not None:
                resolved[("val", path)] = _alias(live, aliases[path], value)  # a view of the parameter, again
            elif kind == "val":
                resolved[("val", path)] = _put_tensor(live(path), value, meta.get(path, False), used, grad)
            elif kind == "arr":
                resolved[("arr", path)] = _put_array(live(path), value, meta[path], used)
        order = {"module": 0, "optimizer": 1}
        objs = []
        for key in tensors:
            kind, _, path = key.partition("/")
            if kind == "obj":
                obj = live(path)
                if obj is MISSING:
                    raise RestoreError(f"The replay has no {path!r} to restore into: the recorded cells made it. "
                                       "Re-run the cells that define it, or replay with the recorded cells.")
                objs.append((order.get(_kind(obj), 2), path, obj))
        for _, path, obj in sorted(objs, key=lambda x: x[0]):
            tree = put_leaves(tensors[f"obj/{path}"], leaves_of(path))
            resolved[("obj", path)] = obj
            if isinstance(obj, torch.Generator):
                recorded_on = placed.get(f"obj/{path}", "cpu")
                if obj.device.type != torch.device(recorded_on).type:  # Philox state into a CPU generator: no
                    self.lost_rng.add(f"{path} ({recorded_on})")
                else:
                    obj.set_state(tree)
            elif isinstance(obj, torch.optim.Optimizer):
                _add_groups(obj, python.get(f"groups/{path}") or [], token)
                obj.load_state_dict(tree)
            elif frameworks.kind(obj) == "framework":
                frameworks.load_state_dict(obj, tree)
            else:
                obj.load_state_dict(tree)
            if isinstance(obj, torch.nn.Module):
                _restore_module(obj, path, tensors, python)
        for key, value in python.items():
            kind, _, path = key.partition("/")
            if kind == "npgen":
                resolve(ns, path).bit_generator.state = value
            elif kind == "nprs":
                resolve(ns, path).set_state(value)
        for key, data in python.items():
            if not key.startswith("py/"):
                continue
            unit = pickling.loads(data, token)
            if isinstance(unit, pickling.Keep):  # a checkpoint of an older flor_nb holds a copy of KEEP
                continue
            for i, obj in referenced.items():  # a trainer reached by reference is not a value to merge
                memo.setdefault(i, (obj, obj))
            for name, value in unit["roots"].items():
                if value is KEEP:
                    continue
                ns[name] = pickling.merge(value, ns.get(name, MISSING), memo)
            for path, attrs in list(unit["module_attrs"].items()) + list(unit["attrs"].items()):
                target = live(path)
                if target is MISSING:
                    continue
                for k, v in attrs.items():
                    if v is KEEP:
                        continue
                    if type(target) is dict:  # a framework's metrics, kept key by key
                        target[k] = pickling.merge(v, target.get(k, MISSING), memo)
                    else:
                        object.__setattr__(target, k, pickling.merge(v, getattr(target, k, MISSING), memo))
        for path, h in python.get("big", {}).items():
            value = live(path)
            if value is MISSING or content_hash(value) != h:
                problems.append(f"{path} (too large to store) differs from the recording")
        torch.set_rng_state(tensors["rng/torch"])
        # kept apart: lost only if the recording drew from them, which a replay's checks tell (worker.py)
        self.unplaced_cuda_rng = set(devices.set_cuda_rng_states(tensors.get("rng/cuda"), self.device_map))
        np.random.set_state(python["rng/numpy"])
        random.setstate(python["rng/random"])
        if "devflags" in python:  # the settings in force when this state was captured
            self.flag_problems = devices.apply_flags(python["devflags"], env=False)
        return problems


def advance(it, path: str, seed: int, n: int) -> str | None:
    """Bring a DataLoader iterator the replay's cells rebuilt to where the recording's was: the same one (its
    base seed, drawn when it was made) having yielded ``n`` batches. The batches on the way are drawn again and
    dropped. Done before anything else is restored, so the RNGs it draws from are then put back. Returns why it
    could not be done, or None. Where it could not, and the replay reads it, the iterator's digest ("iters":
    base seed and batches drawn) differs at the next check of the state, which names it."""
    if it is MISSING:  # the replayed code makes it (again) before reading it, or fails on the name
        return None
    if not isinstance(it, torch.utils.data.dataloader._BaseDataLoaderIter):
        return f"{path} (a DataLoader iterator) is not one in the replay, so it starts elsewhere in the data"
    if int(it._base_seed) != seed:
        return (f"{path} is another DataLoader iterator than the recording's (made again since: another base "
                "seed), so the replay draws other batches")
    if it._num_yielded > n:
        return f"{path} has drawn {it._num_yielded} batches, past the recording's {n}: the replay draws other batches"
    try:
        for _ in range(n - it._num_yielded):
            next(it)
    except StopIteration:
        return f"{path} ran out after {it._num_yielded} batches, before the recording's {n}"
    return None


def _kind(obj):
    if isinstance(obj, torch.nn.Module):
        return "module"
    if isinstance(obj, torch.optim.Optimizer):
        return "optimizer"
    return "other"


def _restore_module(module, path, tensors, python):
    grads = tensors.get(f"grad/{path}", {})
    for n, p in module.named_parameters():  # on the parameter's device, wherever the checkpoint was loaded
        p.grad = grads[n].to(p.device, copy=True) if n in grads else None
    for name, value in tensors.get(f"buf/{path}", {}).items():
        owner, _, bname = name.rpartition(".")
        m = module.get_submodule(owner) if owner else module
        with torch.no_grad():
            m._buffers[bname].copy_(value)
    for m, flag in zip(module.modules(), python.get(f"train/{path}", [])):
        m.training = flag
    for p, flag in zip(module.parameters(), python.get(f"reqgrad/{path}", [])):
        p.requires_grad_(flag)


def _add_groups(opt, groups: list, token):
    """Parameter groups added during training (``add_param_group``) exist in the recording, not yet here."""
    if len(groups) < len(opt.param_groups):
        raise RestoreError(f"The optimizer has {len(opt.param_groups)} parameter groups here but "
                           f"{len(groups)} in the recording. Replay with the recorded cells.")
    for toks in groups[len(opt.param_groups):]:
        params = [token(*t) for t in toks]
        if any(p is KEEP or not isinstance(p, torch.Tensor) for p in params):
            raise RestoreError("A parameter group added during training holds tensors the replay cannot find.")
        opt.add_param_group({"params": params})


def _alias(live, alias, value):
    """A view into the live parameter/gradient storage a recorded tensor shared, or None if it cannot be one."""
    base_path, offset, shape, stride = alias
    base = live(base_path)
    if not isinstance(base, torch.Tensor) or base.dtype != value.dtype or base.device != value.device:
        return None
    try:
        return base.detach().as_strided(shape, stride, offset)
    except RuntimeError:
        return None


def _put_tensor(live, value, requires_grad, used: set, grad):
    if (isinstance(live, torch.Tensor) and id(live) not in used and live.shape == value.shape
            and live.dtype == value.dtype and live.device == value.device):
        used.add(id(live))
        with torch.no_grad():
            live.copy_(value)
        target = live
    else:
        target = value.clone()
    if target.is_leaf and (target.is_floating_point() or target.is_complex()):
        target.requires_grad_(bool(requires_grad))
    if target.is_leaf:
        target.grad = None if grad is None else grad.to(target.device, copy=True)
    return target


def _put_array(live, value, dtype, used: set):
    arr = value.numpy().astype(dtype, copy=True)
    if (isinstance(live, np.ndarray) and id(live) not in used and live.shape == arr.shape
            and live.dtype == arr.dtype and live.flags.writeable):
        used.add(id(live))
        live[...] = arr
        return live
    return arr


def _restore_legacy(ns, snap):
    """Checkpoints of flor_nb 0.1 (schema 2): variables pickled one by one."""
    import pickle

    tensors, python = snap["tensors"], snap["python"]
    for key, value in tensors.items():
        kind, _, path = key.partition("/")
        if kind == "obj":
            obj = resolve(ns, path)
            obj.set_state(value) if isinstance(obj, torch.Generator) else obj.load_state_dict(value)
        elif kind == "grad":
            for n, p in resolve(ns, path).named_parameters():
                p.grad = value[n].clone() if n in value else None
    for key, value in python.items():
        kind, _, path = key.partition("/")
        if kind == "train":
            for m, flag in zip(resolve(ns, path).modules(), value):
                m.training = flag
        elif kind == "npgen":
            resolve(ns, path).bit_generator.state = value
        elif kind == "nprs":
            resolve(ns, path).set_state(value)
        elif kind == "var":
            ns[path] = pickle.loads(value)
    for key, value in tensors.items():
        kind, _, name = key.partition("/")
        if kind == "var":
            live = ns.get(name)
            if isinstance(live, torch.Tensor) and live.requires_grad and live.shape == value.shape:
                with torch.no_grad():
                    live.copy_(value)
            else:
                ns[name] = value.clone()
    torch.set_rng_state(tensors["rng/torch"])
    np.random.set_state(python["rng/numpy"])
    random.setstate(python["rng/random"])
    return []
