"""Snapshots of everything a recorded epoch reads or changes, and their digests.

A *snapshot* is a plain dict copied out of the live objects (nothing aliases
them, so training can go on while it is written)::

    tensors:  obj/<path>     state_dict of a module, optimizer, scheduler, ... (torch generator: its state)
              grad/<path>    {param name: grad} of a module;  buf/<path>: its non-persistent buffers
              val/<path>     a tensor held by value (valgrad/<path>: its .grad);  arr/<path>: a numpy array
              rng/torch
              fchunks/<path> a long list of floats (a loss history) in tensors of up to CHUNK values (not a stream)
    python:   py/<root>      one pickle of the roots that share objects, with module attributes and the
                             attributes of objects whose state_dict() failed (see pickling.py)
              leaves/<path>  non-tensor leaves of a state_dict (numpy scalars, ...), pickled
              chunks/<path>  a long list of other plain values, one pickle per chunk
              train/<path>, reqgrad/<path>, groups/<path>, npgen/<path>, nprs/<path>, vmeta,
              rng/numpy, rng/random, big
    digests:  {stream: digest} of the Python streams (tensor streams are digested when written)
    not_captured, notes, data, roots

What is in it is found by :func:`flor_nb.capture.walk`. Putting a snapshot back is in restore.py,
the host buffers it is copied into in snapshot_pool.py.
"""
from __future__ import annotations

import pickle
import random
import warnings

import numpy as np
import torch

from . import devices, pickling
from .capture import CHUNK, Graph, Scope, _unsaveable, child_path, walk
from .capture import limits as capture_limits
from .clock import CLOCK, ClockAttrs
from .fingerprint import fingerprint
from .hashing import hash_bytes
from .pickling import KEEP
from .restore import Restorer, RestoreError, _restore_module  # noqa: F401 - re-exported
from .snapshot_pool import BufferPool, _host_copy, wait_copies  # noqa: F401 - re-exported
from .tensor_bytes import _raw, content_hash  # noqa: F401 - re-exported
from .trees import dense_leaf, map_tree, split_leaves

__all__ = ["Scope", "Capturer", "BufferPool", "RestoreError"]


class Capturer(Restorer):
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
        self.unplaced_cuda_rng: set = set()  # cuda:i whose recorded generator state the last restore could not set
        self.flag_problems: list = []  # recorded determinism settings that could not be set here
        self._gpu_noted = False
        self._fchunks: dict = {}  # path -> (length, hashes of its CHUNK pickles, stored pieces): _float_chunks
        # Attributes set from the wall clock (a trainer's self.iter_time) are not compared. A replay sets this to
        # the recording's, so both digest the same attributes; runs recorded before it compare them all.
        self.clock_attrs = ClockAttrs()
        self.advanced: set = set()  # DataLoader iterators a restore drew forward to their recorded position

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
        omitted_bytes = 0  # what skip leaves out

        def dup(tree, key):
            where = devices.tree_devices(tree)
            if where is not None and where != "cpu":
                placed[key] = where
            if key in skip:  # recomputed before any read: only its digest is kept, so replay still checks it
                digests.update(_in_place_digests({key: map_tree(tree, lambda t: dense_leaf(t, _same))}))
                nonlocal omitted_bytes
                omitted_bytes += tensor_bytes(tree)
                return None
            return map_tree(tree, lambda t: dense_leaf(t, leaf or _same))
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
                floats = self._float_chunks(path, values, chunks)
                if floats is None:
                    python[f"chunks/{path}"] = chunks
                else:  # a history of floats (a loss list): tensors, so stored compactly and never unpickled
                    tensors[f"fchunks/{path}"] = floats
        python["vmeta"] = dict(sorted(meta.items()))
        python["aliases"] = dict(sorted(g.aliases.items()))
        python["big"] = {path: content_hash(v) for path, v in sorted(g.big.items())}
        if g.iterators:  # DataLoader iterators kept across units: which one (its base seed) and how far it got
            python["iters"] = {path: [int(it._base_seed), int(it._num_yielded)]
                               for path, it in sorted(g.iterators.items())}
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
                digests[f"var/{root}"] = fingerprint(self.ns[root], token, self.clock_attrs)
        # One stream per attribute: an attribute a probe adds (a hook handle) is new, not a difference.
        owners = {**g.attr_owner, **g.attr_objects}
        for path, attrs in list(g.module_attrs.items()) + [(p, _state_attrs(o)) for p, o in g.attr_objects.items()]:
            clock = self.clock_attrs(type(owners[path])) if path in owners else ()
            for k, v in attrs.items():
                digests[f"attrs/{child_path(path, k)}"] = fingerprint(CLOCK if k in clock else v, token,
                                                                      self.clock_attrs)
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
            "omitted_bytes": omitted_bytes,
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

    def _float_chunks(self, path: str, values: list, chunks: list) -> list | None:
        """A long list of floats as tensors of up to CHUNK values each: float32 where every value of the piece
        is one exactly (``loss.item()`` of a float32 loss is), else float64; bit for bit, NaN payloads and
        -0.0 included. None when an item is not a float (an int, a bool): the list is then pickled.

        Pieces already stored stay as they are while the values they hold have not changed (``chunks``, the
        list's pickles per CHUNK, tell): a history that grows adds pieces for its new values only. A last
        piece under CHUNK // 4 values is written again next time; one that long is kept, so a history
        checkpointed every few hundred steps does not rewrite a partial chunk each time."""
        hashes = [hash_bytes(c) for c in chunks]
        known = self._fchunks.get(path)
        n, same_to, pieces = len(values), 0, []
        if known is not None:  # how far the list is what it was at the last snapshot
            old_n, old_hashes, pieces = known
            for j, h in enumerate(old_hashes):
                lo, hi = j * CHUNK, min((j + 1) * CHUNK, old_n)
                if hi > n:
                    break
                now = hashes[j] if hi == min((j + 1) * CHUNK, n) else hash_bytes(pickle.dumps(
                    values[lo:hi], protocol=pickle.HIGHEST_PROTOCOL))  # the old last chunk, since grown
                if now != h:
                    break
                same_to = hi
            pieces = [p for p in pieces if p[1] <= same_to and not p[3]]
        start = pieces[-1][1] if pieces else 0
        while start < n:
            end = min(start + CHUNK, n)
            part = values[start:end]
            if not all(type(v) is float for v in part):
                self._fchunks.pop(path, None)
                return None
            wide = torch.tensor(part, dtype=torch.float64)
            narrow = wide.to(torch.float32)
            exact = torch.equal(narrow.to(torch.float64).view(torch.int64), wide.view(torch.int64))
            pieces.append((start, end, narrow if exact else wide, end - start < CHUNK // 4))
            start = end
        self._fchunks[path] = (n, hashes, pieces)
        return [p[2] for p in pieces]

    def digests(self) -> dict:
        """Digests of every stream, now (tensors hashed in place): how a replay checks it matches."""
        from .checkpoint import tensor_digests

        from .checkpoint import ROOTS

        snap = self.snapshot(copy=False)
        return {**tensor_digests(snap["tensors"]), **snap["digests"], ROOTS: snap["roots"]}


def _state_attrs(obj) -> dict:
    from .capture import _NOT_STATE_ATTRS

    return {k: v for k, v in vars(obj).items() if k not in _NOT_STATE_ATTRS}


def _nonpersistent_buffers(module) -> dict:
    out = {}
    for mname, m in module.named_modules():
        for bname in sorted(m._non_persistent_buffers_set):  # a set: its order changes with the hash seed
            b = m._buffers.get(bname)
            if b is not None:
                out[f"{mname}.{bname}" if mname else bname] = b
    return out


def tensor_bytes(tree) -> int:
    """Bytes of the tensors in a snapshot's value (a tensor, or dicts, lists and tuples of them)."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


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
                 if kind == "module" and all(id(p) in cleared for p in obj.parameters())
                 and next(obj.parameters(), None) is not None}
    return keys


def _same(t):
    return t
