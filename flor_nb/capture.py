"""What a recorded epoch can read or change: found by reachability from the cell's names.

The *roots* are the names the cell reads or binds, the names read by the
functions it calls (transitively, methods of classes defined in the notebook
included), and ``--state`` additions. From each root the walk follows
containers, instance attributes and module attributes, and sorts what it meets:

- *stateful* objects, saved through their own API: modules, optimizers,
  schedulers, grad scalers, anything with ``state_dict``/``load_state_dict``,
  torch and numpy generators;
- *tensors* and numeric *arrays* held by value (not parameters or buffers of a
  captured module), stored as content-addressed blobs;
- plain Python values (the roots themselves, attributes of modules), pickled;
- *code* (functions, classes, modules): rebuilt from the recorded cells;
- *data* (DataLoader, Dataset, Sampler): not copied; their generators are state;
- *not captured*: objects that cannot be saved (open files, locks, iterators,
  progress bars, values over the size limit), each with the reason.

Every object gets one *path* (``trainer.model``, ``log['hist']``), the first
found in breadth-first order, which names it in checkpoints and verdicts and
finds its live counterpart when restoring.

This module is the walk itself; the roots are found by :mod:`~flor_nb.roots`, objects sorted by
:mod:`~flor_nb.kinds`, paths made and resolved by :mod:`~flor_nb.paths`, and tensors that are references
told from values by :mod:`~flor_nb.tensor_refs`.
"""
from __future__ import annotations

import os
import types
import weakref
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from . import frameworks
from .kinds import _ATOMIC_TYPES, CODE, DATA, kind_of, output_kind, unsaveable
from .kinds import ATOMIC, _unsaveable  # noqa: F401 - importable from here, as before the split
from .paths import attr_path, child_path, item_path
from .paths import resolve  # noqa: F401 - importable from here, as before the split
from .roots import Scope, root_names
from .roots import reads  # noqa: F401 - importable from here, as before the split
from .tensor_refs import classify_tensors, optimizer_state_refs

_MODULE_INTERNAL = frozenset(vars(torch.nn.Module()))
_LOADER_ITER = torch.utils.data.dataloader._BaseDataLoaderIter
# Scheduler attributes that are not state: the optimizer (captured on its own) and the lr functions (code).
_NOT_STATE_ATTRS = frozenset({"optimizer", "lr_lambdas", "lr_lambda"})


def limits() -> dict:
    """Size limits of what is captured; a run records them so its replays walk the same way."""
    return {"max_objects": int(os.environ.get("FLOR_NB_MAX_OBJECTS", 1_000_000)),  # Python objects per root
            "max_bytes": int(float(os.environ.get("FLOR_NB_MAX_VALUE_BYTES", 1 << 30))),  # per tensor or array
            "weak_refs": True,  # runs recorded before weak references were saved replay without them
            "iterators": True,  # and before DataLoader iterators were saved as their position
            "framework_paths": True}  # and before a trainer's checkpoint files were kept relative to their folder


@dataclass
class Graph:
    """The result of one walk (see the module docstring)."""

    roots: list = field(default_factory=list)  # names captured by value, in walk order
    stateful: dict = field(default_factory=dict)  # path -> (kind, object)
    states: dict = field(default_factory=dict)  # path -> state_dict() result, for kind "stateful"
    attr_objects: dict = field(default_factory=dict)  # path -> object whose state_dict() raised: saved by its attributes
    module_attrs: dict = field(default_factory=dict)  # module path -> {attribute: value} of user attributes
    tensors: dict = field(default_factory=dict)  # path -> tensor held by value
    arrays: dict = field(default_factory=dict)  # path -> numeric ndarray held by value
    big: dict = field(default_factory=dict)  # path -> tensor/array over max_bytes: digested, not stored
    chunked: dict = field(default_factory=dict)  # path -> a long list of plain values, stored in chunks
    aliases: dict = field(default_factory=dict)  # tensor path -> (base path, offset, shape, stride): shares storage
    identity: dict = field(default_factory=dict)  # id -> token of plain containers that are someone else's state
    owners: dict = field(default_factory=dict)  # id of an object reached -> the root it was first reached from
    refs: dict = field(default_factory=dict)  # id(obj) -> token, for objects pickled by reference
    units: dict = field(default_factory=dict)  # root -> the root whose pickle it shares (shared references)
    owner: dict = field(default_factory=dict)  # module-attribute or attribute-object path -> root it was reached from
    not_captured: dict = field(default_factory=dict)  # path -> reason
    notes: dict = field(default_factory=dict)  # path -> how it was captured, when not the usual way
    data: dict = field(default_factory=dict)  # path -> type name of data objects (not copied)
    outputs: dict = field(default_factory=dict)  # path -> what it is: progress bars, log files, writers
    attr_owner: dict = field(default_factory=dict)  # module_attrs path -> the object whose attributes they are
    iterators: dict = field(default_factory=dict)  # path -> a DataLoader iterator kept across units (its position)
    framework_paths: bool = False  # the walk's setting (see walk): how a trainer's state names its files
    weak: dict = field(default_factory=dict)  # path -> a weak reference to an object the state holds (pickled as one)
    keep: list = field(default_factory=list)  # every object visited, alive while ids are in use

    def token(self, obj):
        return self.refs.get(id(obj))


def _atomic_seq(values) -> bool:
    return set(map(type, values)) <= _ATOMIC_TYPES


def walk(ns: dict, scope: Scope, order=(), max_objects: int | None = None, max_bytes: int | None = None,
         weak_refs: bool = False, iterators: bool = False, framework_paths: bool = False) -> Graph:
    """Find everything to capture from ``ns`` (see the module docstring).

    ``order``: root names to visit first (a replay passes the recording's order so that
    objects reachable by several paths get the same path as when they were recorded).
    ``max_objects``, ``max_bytes``, ``weak_refs``, ``iterators``: see :func:`limits` (the defaults; a run
    recorded before ``weak_refs`` left every weak reference out, and its replays do too, so their pickles
    compare; one recorded before ``iterators`` has no iterator positions, so they stay "not captured"; one
    recorded before ``framework_paths`` kept neither a Lightning ModelCheckpoint's knowledge nor HF's best
    checkpoint relative to its folder, and its replays capture trainers as it did).
    """
    lim = limits()
    max_objects = lim["max_objects"] if max_objects is None else max_objects
    max_bytes = lim["max_bytes"] if max_bytes is None else max_bytes
    names, excluded = root_names(ns, scope)
    g = Graph(framework_paths=framework_paths)
    for n in sorted(excluded):
        g.not_captured[n] = "left out by --state"
    first = [n for n in order if n in names]
    ordered = first + sorted(names - set(first))
    seen: dict[int, str] = {}  # id -> root it was first reached from
    parent: dict[str, str] = {}

    def unit(r):
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    queue = deque()
    counts: dict[str, list] = {}  # root -> [objects, bytes]
    for name in ordered:
        value = ns[name]
        if isinstance(value, CODE):
            continue
        g.roots.append(name)
        parent[name] = name
        queue.append((name, name, value))
        counts[name] = [0, 0]
    params: dict[int, str] = {}
    while queue:
        root, path, obj = queue.popleft()
        if root in g.not_captured:
            continue
        t = type(obj)
        if t in _ATOMIC_TYPES or isinstance(obj, np.generic):
            continue
        if id(obj) in seen:  # reached again: values sharing an object are pickled together
            other = seen[id(obj)]
            if other != root and id(obj) not in g.refs:
                parent[unit(root)] = unit(other)
            continue
        seen[id(obj)] = root
        g.keep.append(obj)
        count = counts[root]
        count[0] += 1
        kind = kind_of(obj)
        if kind is not None:
            _stateful(g, path, kind, obj, queue, root, params)
            continue
        if isinstance(obj, torch.Tensor):
            nbytes = obj.numel() * obj.element_size()
            (g.big if nbytes > max_bytes else g.tensors)[path] = obj
            g.refs[id(obj)] = ("val", path)  # for now; parameters of modules are re-tokened below
            continue
        if isinstance(obj, np.ndarray) and obj.dtype.kind in "biufc" and not obj.dtype.hasobject:
            (g.big if obj.nbytes > max_bytes else g.arrays)[path] = obj
            g.refs[id(obj)] = ("arr", path)
            continue
        if isinstance(obj, CODE):
            if isinstance(obj, types.MethodType):
                queue.append((root, f"{path}.__self__", obj.__self__))
            continue
        if isinstance(obj, DATA) or frameworks.kind(obj) == "rebuilt":
            _data(g, path, obj, queue, root)
            continue
        out = output_kind(obj)
        if out:
            g.outputs[path] = out
            continue
        if iterators and isinstance(obj, _LOADER_ITER) and not obj._persistent_workers:
            g.iterators[path] = obj  # its position is saved (state.py); a replay brings its rebuilt one there
            g.notes[path] = ("a DataLoader iterator kept across units: saved as its position; a replay advances the "
                             "one its cells rebuild to it, drawing the batches again without training on them")
            g.refs[id(obj)] = ("keep", "")
            continue
        if t is weakref.ref and weak_refs:  # saved when what it points to is captured (after the walk: _weak_refs)
            g.weak[path] = obj
            continue
        if t is weakref.ref:
            g.refs[id(obj)] = ("keep", "")  # left out, as a run recorded before weak references were saved did
        reason = unsaveable(obj)
        if reason:
            g.not_captured[path] = f"{t.__name__}: {reason}"
            continue
        if count[0] > max_objects:
            g.not_captured[root] = (f"{type(ns[root]).__name__}{_size(ns[root])} too large to capture (over "
                                    f"{max_objects:,} objects; raise FLOR_NB_MAX_OBJECTS to capture it)")
            continue
        _children(obj, path, root, queue, count, g)
    classify_tensors(g, params)
    optimizer_state_refs(g, seen)
    _weak_refs(g)
    for path, values in g.chunked.items():
        g.identity[id(values)] = ("chunks", path)
    g.owners = seen
    g.units = {r: unit(r) for r in g.roots}
    g.owner = {p: unit(r) for p, r in g.owner.items()}
    return g


def state_objects(ns: dict, roots, **limits) -> tuple[Graph, dict]:
    """The walk of the state from ``roots`` (names in ``ns``) and {id: root} of every object it holds, a module's
    parameters and buffers too: what a replay restores and checks, so other digests name them, not read them.
    Keep the graph while the ids are in use (it keeps the objects alive)."""
    roots = sorted(n for n in roots if n in ns and not isinstance(ns[n], CODE))
    g = walk(ns, Scope(assigned=set(), free=set(), only=set(roots)), roots, **limits)
    ids = dict(g.owners)
    for path, (kind, obj) in g.stateful.items():
        if kind == "module":
            ids.update({id(t): path for t in [*obj.parameters(), *obj.buffers()]})
    return g, ids


def _weak_refs(g: Graph):
    """A weak reference is saved as one to the same object when the captured state holds that object (an LSTM's
    ``_flat_weight_refs`` point at its own parameters): restore makes it point at the restored object. One to
    anything else cannot be restored, and is listed."""
    for path, ref in list(g.weak.items()):
        target = ref()
        if target is None or id(target) not in g.refs:
            del g.weak[path]
            g.not_captured[path] = ("ReferenceType: a weak reference cannot be saved (" + (
                "its object is gone)" if target is None else
                f"it points at a {type(target).__name__} the captured state does not hold)"))


def _data(g: Graph, path, obj, queue, root):
    """A DataLoader, Dataset or Sampler: rebuilt by the cells, not copied; its generators are state."""
    g.data[path] = type(obj).__name__
    g.refs[id(obj)] = ("data", path)
    if isinstance(obj, torch.utils.data.DataLoader) and obj.persistent_workers and obj.num_workers:
        g.not_captured[path] = ("DataLoader with persistent_workers=True: its workers' random state lives in "
                                "their processes and cannot be saved, so augmentations may differ in replay")
    for attr in ("generator", "sampler", "batch_sampler"):
        child = getattr(obj, attr, None)
        if child is not None and not isinstance(child, torch.utils.data.Dataset):
            queue.append((root, f"{path}.{attr}", child))


CHUNK = 1024  # items per stored chunk of a long list: a history that grows rewrites only its last chunk


def _size(obj) -> str:
    """' of N items' for a container the walk gave up on, so the user sees how large it is; '' otherwise."""
    try:
        return f" of {len(obj):,} items"
    except Exception:  # noqa: BLE001 - no len(), or a __len__ that raises: the type alone is said
        return ""


def _children(obj, path, root, queue, count, g=None):
    t = type(obj)
    if isinstance(obj, (list, tuple)):
        if _atomic_seq(obj):
            count[0] += len(obj)
            if t is list and len(obj) >= CHUNK and g is not None:
                g.chunked[path] = obj
                g.refs[id(obj)] = ("chunks", path)
            return
        for i, v in enumerate(obj):
            queue.append((root, f"{path}[{i}]", v))
    elif isinstance(obj, dict):
        if _atomic_seq(obj.values()) and _atomic_seq(obj.keys()):
            count[0] += len(obj)
            return
        for k, v in list(obj.items()):
            if type(k) not in _ATOMIC_TYPES:
                queue.append((root, f"{path}[#key]", k))
            queue.append((root, item_path(path, k), v))
    elif isinstance(obj, (set, frozenset)):
        if _atomic_seq(obj):
            count[0] += len(obj)
            return
        for i, v in enumerate(obj):
            queue.append((root, f"{path}[#{i}]", v))
    else:
        attrs = getattr(obj, "__dict__", None)
        if isinstance(attrs, dict):
            for k, v in list(attrs.items()):
                queue.append((root, child_path(path, k), v))
        for slot in _slots(t):
            if hasattr(obj, slot):
                queue.append((root, child_path(path, slot), getattr(obj, slot)))


def _slots(t) -> list[str]:
    out = []
    for klass in t.__mro__:
        s = vars(klass).get("__slots__", ())
        out.extend([s] if isinstance(s, str) else [x for x in s if x not in ("__dict__", "__weakref__")])
    return out


def _stateful(g: Graph, path, kind, obj, queue, root, params):
    if kind == "framework":
        _framework(g, path, obj, queue, root)
    if kind == "stateful":
        try:
            g.states[path] = obj.state_dict()
        except Exception as e:  # noqa: BLE001 - any failure: save its attributes instead
            g.attr_objects[path] = obj
            g.owner[path] = root
            g.notes[path] = (f"{type(obj).__name__}.state_dict() raised {type(e).__name__}: {e}; "
                             "captured its attributes instead (all but the optimizer and lr functions)")
            g.refs[id(obj)] = ("attrs", path)
            for k, v in list(vars(obj).items()):
                if k not in _NOT_STATE_ATTRS:
                    queue.append((root, child_path(path, k), v))
            return
    g.stateful[path] = (kind, obj)
    g.refs[id(obj)] = ("obj", path)
    if kind == "module":
        for mname, m in obj.named_modules(remove_duplicate=False):
            mpath = attr_path(path, mname)
            for pname, p in m.named_parameters(recurse=False):
                params.setdefault(id(p), child_path(mpath, pname))
            for bname, b in m.named_buffers(recurse=False):
                if b is not None:
                    params.setdefault(id(b), child_path(mpath, bname))
            internal = frameworks.internal_attrs(type(m))
            user = {k: v for k, v in vars(m).items() if k not in _MODULE_INTERNAL and k not in internal}
            if user and mpath not in g.module_attrs:
                g.module_attrs[mpath] = user
                g.attr_owner[mpath] = m
                g.owner[mpath] = root
                for k, v in user.items():
                    queue.append((root, child_path(mpath, k), v))


def _framework(g: Graph, path, trainer, queue, root):
    """A framework's trainer: its progress state (a state_dict of the adapter's), attributes of a user's
    subclass, callbacks by attribute and metrics by key (one stream each: what a probe adds is new, not a
    difference), and what it owns (model, optimizers, schedulers) walked as usual under its path."""
    g.states[path] = frameworks.state_dict(trainer, paths=g.framework_paths)
    attrs = frameworks.user_attrs(trainer)
    if attrs:
        g.module_attrs[path] = attrs
        g.attr_owner[path] = trainer
        g.owner[path] = root
        for k, v in attrs.items():
            queue.append((root, child_path(path, k), v))
    for suffix, child, how in frameworks.children(trainer):
        p = path + suffix
        if how == "keys" and type(child) is dict:  # metrics: one stream per key (a probe's new metric is new)
            g.module_attrs[p] = dict(child)
            g.owner[p] = root
            for k, v in child.items():
                queue.append((root, item_path(p, k), v))
        elif how == "attrs" and id(child) not in g.refs and isinstance(getattr(child, "__dict__", None), dict):
            g.attr_objects[p] = child
            g.owner[p] = root
            g.refs[id(child)] = ("attrs", p)
            for k, v in list(vars(child).items()):
                queue.append((root, child_path(p, k), v))
        else:
            queue.append((root, p, child))
