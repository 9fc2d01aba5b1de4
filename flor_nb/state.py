"""Snapshots of everything a recorded epoch reads or changes, and putting them back.

A *snapshot* is a plain dict copied out of the live objects (nothing aliases
them, so training can go on while it is written)::

    tensors:  obj/<path>     state_dict of a module, optimizer, scheduler, ... (torch generator: its state)
              grad/<path>    {param name: grad} of a module;  buf/<path>: its non-persistent buffers
              val/<path>     a tensor held by value (valgrad/<path>: its .grad);  arr/<path>: a numpy array
              rng/torch
    python:   py/<root>      one pickle of the roots that share objects, with module attributes and the
                             attributes of objects whose state_dict() failed (see pickling.py)
              leaves/<path>  non-tensor leaves of a state_dict (numpy scalars, ...), pickled
              train/<path>, reqgrad/<path>, groups/<path>, npgen/<path>, nprs/<path>, vmeta,
              rng/numpy, rng/random, big
    digests:  {stream: digest} of the Python streams (tensor streams are digested when written)
    not_captured, notes, data, roots

What is in it is found by :func:`flor_nb.capture.walk`.
"""
from __future__ import annotations

import itertools
import pickle
import random
import warnings

import numpy as np
import torch

from . import devices, frameworks, pickling
from .capture import CHUNK, Graph, Scope, _unsaveable, child_path, resolve, walk
from .capture import limits as capture_limits
from .errors import FlorError
from .fingerprint import fingerprint
from .hashing import hash_bytes
from .pickling import KEEP, MISSING
from .snapshot_pool import BufferPool, _host_copy, wait_copies  # noqa: F401 - re-exported
from .tensor_bytes import _raw, content_hash  # noqa: F401 - re-exported
from .trees import map_tree, put_leaves, split_leaves

__all__ = ["Scope", "Capturer", "BufferPool", "RestoreError"]


class RestoreError(FlorError):
    """A checkpoint cannot be put back into the replay's namespace."""


class Capturer:
    """Captures and restores the state a cell's epochs depend on, in one namespace.

    ``order``: root names to walk first (the recording's, when verifying a replay).
    """

    def __init__(self, ns: dict, scope: Scope, order=(), limits: dict | None = None):
        self.ns, self.scope, self.order = ns, scope, list(order)
        self.limits = limits or capture_limits()
        self.ns_name = ns.get("__name__", "__main__")
        self.bad: set = set()  # ids of objects, and types, that cannot be pickled
        self.unpicklable: dict = {}  # path -> reason, found while pickling
        self.kinds: dict = {}  # path -> kind of the objects saved through their own API (last snapshot)
        self.device_map = devices.DeviceMap()  # where restored tensors go (replay with device=...)
        self.placed: dict = {}  # key -> recorded device(s), of the last restored snapshot
        self.lost_rng: set = set()  # generators recorded on a device with no counterpart here
        self.flag_problems: list = []  # recorded determinism settings that could not be set here
        self._gpu_noted = False

    # -- capture -------------------------------------------------------------------------
    def snapshot(self, copy: bool = True, pool: BufferPool | None = None, dead=None) -> dict:
        """Copy everything needed to resume from here. ``copy=False``: tensors alias the live ones
        and nothing is pickled (for digests taken at once). ``dead`` (a :class:`liveness.Dead`): tensors
        the next unit recomputes before reading them are digested in place, not copied (``python["omitted"]``)."""
        placed: dict = {}  # key -> device(s) of the live tensors, where not the CPU (restore puts them back there)
        if not copy:
            leaf = None
        else:
            leaf = pool.copy if pool is not None else _host_copy
        g = walk(self.ns, self.scope, self.order, **self.limits)
        skip = _dead_keys(g, self.ns, dead) if copy and dead else set()

        def dup(tree, key):
            where = devices.tree_devices(tree)
            if where is not None and where != "cpu":
                placed[key] = where
            if key in skip:  # recomputed before any read: only its digest is kept, so replay still checks it
                digests.update(_in_place_digests({key: tree}))
                return None
            return tree if leaf is None else map_tree(tree, leaf)
        self.order = list(g.roots)
        self.kinds = {**{p: k for p, (k, _) in g.stateful.items()}, **{p: "attrs" for p in g.attr_objects}}
        token = self._token(g)
        tensors, python, digests = {}, {}, {}
        leaves: dict = {}
        for path, (kind, obj) in g.stateful.items():
            key = f"obj/{path}"
            if kind == "module":
                tree, leaves[path] = split_leaves(obj.state_dict())
                tensors[key] = dup(tree, key)
                grads = {n: p.grad for n, p in obj.named_parameters() if p.grad is not None}
                tensors[f"grad/{path}"] = dup(grads, f"grad/{path}")
                extra = _nonpersistent_buffers(obj)
                if extra:
                    tensors[f"buf/{path}"] = dup(extra, f"buf/{path}")
                python[f"train/{path}"] = [m.training for m in obj.modules()]
                python[f"reqgrad/{path}"] = [p.requires_grad for p in obj.parameters()]
            elif kind == "optimizer":
                tree, leaves[path] = split_leaves(obj.state_dict())
                tensors[key] = dup(tree, key)
                python[f"groups/{path}"] = [[token(p) for p in group["params"]] for group in obj.param_groups]
            elif kind in ("stateful", "framework"):
                tree, leaves[path] = split_leaves(g.states[path])
                tensors[key] = dup(tree, key)
            elif kind == "torch_generator":
                tensors[key] = obj.get_state()
                if obj.device.type != "cpu":
                    placed[key] = str(obj.device)
            elif kind == "np_generator":
                python[f"npgen/{path}"] = obj.bit_generator.state
            elif kind == "np_randomstate":
                python[f"nprs/{path}"] = obj.get_state()
        meta = {}
        for path, t in g.tensors.items():
            tensors[f"val/{path}"] = dup(t.detach(), f"val/{path}")
            if t.is_leaf and t.grad is not None:
                tensors[f"valgrad/{path}"] = dup(t.grad, f"valgrad/{path}")
            meta[path] = t.requires_grad
        for path, a in g.arrays.items():
            tensors[f"arr/{path}"] = dup(torch.from_numpy(a) if a.flags.writeable else torch.tensor(a),
                                         f"arr/{path}")
            meta[path] = str(a.dtype)
        for path, values in g.chunked.items():  # long histories: fixed chunks, so old ones dedup on disk
            chunks = [pickle.dumps(values[i:i + CHUNK], protocol=pickle.HIGHEST_PROTOCOL)
                      for i in range(0, len(values), CHUNK)]
            digests[f"chunks/{path}"] = hash_bytes(b"".join(chunks))
            if copy:
                python[f"chunks/{path}"] = chunks
        python["vmeta"] = dict(sorted(meta.items()))
        python["aliases"] = dict(sorted(g.aliases.items()))
        python["big"] = {path: content_hash(v) for path, v in sorted(g.big.items())}
        for key, value in python.items():
            if not key.startswith("chunks/"):
                digests[key] = fingerprint(value, token)
        # One stream per value tensor's meta: a tensor a probe binds (or a metric it logs) is new, not a change.
        del digests["vmeta"]
        for path, m in meta.items():
            digests[f"vmeta/{path}"] = fingerprint(m)
        for path, ls in leaves.items():
            if ls:
                digests[f"leaves/{path}"] = fingerprint(ls, token)
                if copy:
                    python[f"leaves/{path}"] = self._dumps(ls, g, f"{path} (state_dict)")
        units = self._units(g)
        for root in g.roots:
            if root not in g.not_captured and root not in g.outputs:
                digests[f"var/{root}"] = fingerprint(self.ns[root], token)
        # One stream per attribute: an attribute a probe adds (a hook handle) is new, not a difference.
        for path, attrs in list(g.module_attrs.items()) + [(p, _state_attrs(o)) for p, o in g.attr_objects.items()]:
            for k, v in attrs.items():
                digests[f"attrs/{child_path(path, k)}"] = fingerprint(v, token)
        if copy:
            for rep, value in units.items():
                python[f"py/{rep}"] = self._dumps(value, g, rep, g.identity if self._reaches(g, rep) else None)
        tensors["rng/torch"] = torch.get_rng_state()
        cuda_rng = devices.cuda_rng_states()
        if cuda_rng is not None:
            tensors["rng/cuda"] = cuda_rng  # [device i's state]: dropout on cuda:i draws from it
        python["rng/numpy"] = np.random.get_state()
        python["rng/random"] = random.getstate()
        python["devflags"] = devices.flags()  # a cell may change them mid-run: kept with every checkpoint
        python["devices"] = dict(sorted(placed.items()))
        for key in ("rng/numpy", "rng/random", "devflags", "devices"):
            digests[key] = fingerprint(python[key])
        if skip:  # not a stream: what this checkpoint left out (only their digests, above, are kept)
            python["omitted"] = sorted(k for k in skip if k in tensors)
            for k in python["omitted"]:
                del tensors[k]
        events = pool.seal() if pool is not None and copy else []
        if copy and placed and not self._gpu_noted:  # once per recording: how exact its GPU replays can be
            self._gpu_noted = True
            note = devices.recording_note(placed, python["devflags"])
            if note:
                warnings.warn(note, stacklevel=4)
        return {
            "tensors": tensors, "python": python, "digests": digests, "roots": list(g.roots), "events": events,
            "not_captured": {**g.not_captured, **self.unpicklable, **devices.uncaptured(placed)},
            "notes": dict(g.notes), "data": dict(g.data),
            "outputs": dict(g.outputs),
        }

    def _token(self, g: Graph):
        refs, bad = g.refs, self.bad

        def token(obj):
            tok = refs.get(id(obj))
            if tok is None and (id(obj) in bad or type(obj) in bad or _unsaveable(obj)):
                return ("keep", "")
            return tok
        return token

    def _units(self, g: Graph) -> dict:
        """{representative root: what its pickle holds}: roots that share objects, with their attributes."""
        units: dict = {}
        for root in g.roots:
            if root in g.not_captured or root in g.outputs:
                continue
            rep = g.units[root]
            units.setdefault(rep, {"roots": {}, "module_attrs": {}, "attrs": {}})["roots"][root] = self.ns[root]
        for path, attrs in g.module_attrs.items():
            units.setdefault(g.owner[path], {"roots": {}, "module_attrs": {}, "attrs": {}})["module_attrs"][path] = attrs
        for path, obj in g.attr_objects.items():
            units.setdefault(g.owner[path], {"roots": {}, "module_attrs": {}, "attrs": {}})["attrs"][path] = \
                _state_attrs(obj)
        return units

    @staticmethod
    def _reaches(g: Graph, rep: str) -> bool:
        """Whether unit ``rep`` holds a plain container written as a reference (a list stored in chunks, an
        optimizer's state dict): then it needs the pickler that sees plain containers (slower)."""
        return any(g.units.get(g.owners.get(i)) == rep for i in g.identity)

    def _dumps(self, value, g: Graph, where: str, chunked: dict | None = None) -> bytes:
        """Pickle with references; objects that cannot be pickled are found, listed, and left out."""
        try:
            return pickling.dumps(value, g.refs, self.ns_name, self.ns, self.bad, chunked)
        except RecursionError:
            self.unpicklable[where] = "too deeply nested to pickle"
            return pickling.dumps(KEEP, {}, self.ns_name, self.ns, self.bad)
        except Exception:  # noqa: BLE001 - find the parts that fail, leave them out, say so
            found: dict = {}
            bad_ids: set = set()
            pickling.find_unpicklable(value, g.refs, self.ns_name, self.ns, bad_ids, where, found)
            for obj in g.keep:
                if id(obj) in bad_ids and type(obj) not in (list, dict, tuple, set):
                    self.bad.add(type(obj))  # the same kind of object will fail next time too
            self.bad |= bad_ids
            self.unpicklable.update(found)
            try:
                return pickling.dumps(value, g.refs, self.ns_name, self.ns, self.bad, chunked)
            except Exception as e:  # noqa: BLE001
                self.unpicklable[where] = f"cannot be pickled ({type(e).__name__}: {e})"[:300]
                return pickling.dumps(KEEP, {}, self.ns_name, self.ns, self.bad)

    def digests(self) -> dict:
        """Digests of every stream, now (tensors hashed in place): how a replay checks it matches."""
        from .checkpoint import tensor_digests

        from .checkpoint import ROOTS

        snap = self.snapshot(copy=False)
        return {**tensor_digests(snap["tensors"]), **snap["digests"], ROOTS: snap["roots"]}

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
            if unit is KEEP:
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
        problems = []
        for path, h in python.get("big", {}).items():
            value = live(path)
            if value is MISSING or content_hash(value) != h:
                problems.append(f"{path} (too large to store) differs from the recording")
        torch.set_rng_state(tensors["rng/torch"])
        self.lost_rng.update(devices.set_cuda_rng_states(tensors.get("rng/cuda"), self.device_map))
        np.random.set_state(python["rng/numpy"])
        random.setstate(python["rng/random"])
        if "devflags" in python:  # the settings in force when this state was captured
            self.flag_problems = devices.apply_flags(python["devflags"], env=False)
        return problems


def _kind(obj):
    if isinstance(obj, torch.nn.Module):
        return "module"
    if isinstance(obj, torch.optim.Optimizer):
        return "optimizer"
    return "other"


def _state_attrs(obj) -> dict:
    from .capture import _NOT_STATE_ATTRS

    return {k: v for k, v in vars(obj).items() if k not in _NOT_STATE_ATTRS}


def _nonpersistent_buffers(module) -> dict:
    out = {}
    for mname, m in module.named_modules():
        for bname in m._non_persistent_buffers_set:
            b = m._buffers.get(bname)
            if b is not None:
                out[f"{mname}.{bname}" if mname else bname] = b
    return out


def _in_place_digests(tensors: dict) -> dict:
    from .checkpoint import tensor_digests

    return tensor_digests(tensors)


def _dead_keys(g: Graph, ns: dict, dead) -> set[str]:
    """Tensor keys of this walk that ``dead`` (:class:`liveness.Dead`) says the next unit recomputes first:
    activations bound to a root name, and gradients the body clears before its backward pass."""
    keys = set()
    for name in dead.names:
        t = g.tensors.get(name)
        if t is not None and name not in g.aliases:
            keys |= {f"val/{name}", f"valgrad/{name}"}
    cleared: set = set()
    for how, name in dead.cleared:
        obj = ns.get(name)
        if how == "list" and isinstance(obj, (list, tuple)):
            cleared |= {id(p) for p in obj if isinstance(p, torch.Tensor)}
        elif how == "zero_grad" and isinstance(obj, torch.optim.Optimizer):
            cleared |= {id(p) for group in obj.param_groups for p in group["params"]}
        elif how == "zero_grad" and isinstance(obj, torch.nn.Module):
            cleared |= {id(p) for p in obj.parameters()}
    if cleared:
        keys |= {f"valgrad/{path}" for path, t in g.tensors.items() if id(t) in cleared}
        keys |= {f"grad/{path}" for path, (kind, obj) in g.stateful.items()
                 if kind == "module" and all(id(p) in cleared for p in obj.parameters())}
    return keys


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
