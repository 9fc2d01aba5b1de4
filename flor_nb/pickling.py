"""Pickle captured Python values with references, and put them back in place.

Values are pickled with :class:`RefPickler`: modules, optimizers, tensors and
other objects captured on their own become *tokens*, and code (functions,
classes) defined in the notebook is pickled by its name in the namespace, so a
class defined in a cell unpickles in a replay worker, and an edited helper is
the one used. Objects that cannot be saved become a *keep* token: on restore
the object already at that place stays.

On restore, :func:`merge` writes the unpickled values *into* the live objects
(lists, dicts, sets, plain instances) instead of replacing them, so code that
holds a reference to them (a hook, a closure, another object) sees the restored
state, and references shared between values stay shared.
"""
from __future__ import annotations

import io
import pickle
import types
import weakref
from collections import defaultdict

from .kinds import DATA, _unsaveable

PROTOCOL = 5
MISSING = object()


class Keep:
    """Stands for an object that was not saved: the live one stays."""

    def __repr__(self):
        return "<not captured>"

    def __reduce__(self):  # unpickles as the one KEEP, so ``is KEEP`` holds for a whole unit left out
        return "KEEP"


KEEP = Keep()


def _ref(kind, path):  # the callable recorded in pickles; RefUnpickler resolves it itself
    raise pickle.UnpicklingError("flor_nb references are resolved by RefUnpickler only")


_ref.__module__ = __name__


class RefPickler(pickle.Pickler):
    """Pickles values; objects with a token in ``refs`` (by id) are written as that token."""

    def __init__(self, file, refs: dict, ns_name: str, ns: dict, bad: set):
        super().__init__(file, protocol=PROTOCOL)
        self.refs, self.ns_name, self.ns, self.bad = refs, ns_name, ns, bad

    def reducer_override(self, obj):
        tok = self.refs.get(id(obj))
        if tok is not None:
            return _ref, tok
        if id(obj) in self.bad or type(obj) in self.bad:
            return _ref, ("keep", "")
        if type(obj) is weakref.ref:  # to an object with a token (capture._weak_refs): a new one to its restored self
            target = obj()
            if target is not None and id(target) in self.refs:
                return weakref.ref, (target,)
            return _ref, ("keep", "")
        if isinstance(obj, (type, types.FunctionType)):
            name = getattr(obj, "__qualname__", "")
            if "<" in name:  # a lambda or a local function: code, rebuilt by the cells
                return _ref, ("keep", "")
            if obj.__module__ == self.ns_name and self.ns.get(name) is obj:
                return _ref, ("global", name)
            return NotImplemented
        if isinstance(obj, DATA) or _unsaveable(obj):
            return _ref, ("keep", "")
        return NotImplemented


class ChunkPickler(RefPickler):
    """A :class:`RefPickler` that also sees plain lists and dicts (``reducer_override`` never does):
    those that are references (a long list stored in chunks, an optimizer's own state dict) are written
    as persistent ids. Used only where such a container is reachable: ``persistent_id`` runs for every
    object pickled."""

    def __init__(self, file, refs, ns_name, ns, bad, chunked: dict):
        super().__init__(file, refs, ns_name, ns, bad)
        self.chunked = chunked

    def persistent_id(self, obj):
        return self.chunked.get(id(obj))


class RefUnpickler(pickle.Unpickler):
    """Unpickles what :class:`RefPickler` wrote; ``resolve(kind, path)`` turns tokens into objects."""

    def __init__(self, file, resolve):
        super().__init__(file)
        self._resolve = resolve

    def find_class(self, module, name):
        if module == __name__ and name == "_ref":
            return self._resolve
        return super().find_class(module, name)

    def persistent_load(self, pid):
        return self._resolve(*pid)


def dumps(value, refs, ns_name, ns, bad: set, chunked: dict | None = None) -> bytes:
    buf = io.BytesIO()
    if chunked:
        ChunkPickler(buf, refs, ns_name, ns, bad, chunked).dump(value)
    else:
        RefPickler(buf, refs, ns_name, ns, bad).dump(value)
    return buf.getvalue()


def loads(data: bytes, resolve):
    return RefUnpickler(io.BytesIO(data), resolve).load()


def find_unpicklable(value, refs, ns_name, ns, bad: set, path: str, found: dict, depth: int = 0):
    """Add to ``bad`` (by id) the objects inside ``value`` that cannot be pickled; note their paths."""
    try:
        dumps(value, refs, ns_name, ns, bad)
        return
    except RecursionError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure: look for the culprit below
        error = e
    children = []
    if isinstance(value, (list, tuple)):
        children = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    elif isinstance(value, dict):
        children = [(f"{path}[{k!r}]", v) for k, v in value.items()]
    elif isinstance(value, (set, frozenset)):
        children = [(f"{path}[#{i}]", v) for i, v in enumerate(value)]
    elif isinstance(getattr(value, "__dict__", None), dict) and depth < 50:
        children = [(f"{path}.{k}", v) for k, v in vars(value).items()]
    for p, child in children:
        find_unpicklable(child, refs, ns_name, ns, bad, p, found, depth + 1)
    try:
        dumps(value, refs, ns_name, ns, bad)
    except Exception:  # noqa: BLE001 - the object itself cannot be pickled
        bad.add(id(value))
        found[path] = f"{type(value).__name__} cannot be pickled ({type(error).__name__}: {error})"[:300]


# -- restore in place -------------------------------------------------------------------
def _mergeable(t) -> bool:
    if t in (list, dict, set, defaultdict):
        return True
    if issubclass(t, type):  # a class (its type a metaclass, e.g. ABCMeta): bound as itself, its dict is read-only
        return False
    if t.__module__ in ("builtins", "collections") or not isinstance(getattr(t, "__dict__", None), types.MappingProxyType):
        return False
    if not t.__dictoffset__:  # its instances have no attributes to merge into (a weak reference)
        return False
    # Plain instances only: an object that pickles itself its own way is replaced, not merged.
    return (t.__reduce_ex__ is object.__reduce_ex__ and t.__reduce__ is object.__reduce__
            and getattr(t, "__setstate__", None) is None and "__slots__" not in vars(t))


def merge(new, live, memo: dict):
    """Return the object to bind: ``live`` updated in place to equal ``new`` where types allow, else ``new``.

    ``memo`` maps ids of unpickled objects to what they became, so shared references stay shared.
    """
    if new is KEEP:
        return None if live is MISSING else live
    t = type(new)
    if t in (int, float, str, bool, bytes, type(None)):
        return new
    done = memo.get(id(new))
    if done is not None:
        return done[1]
    if live is not MISSING and type(live) is t and live is not new and _mergeable(t):
        memo[id(new)] = (new, live)
        if t is list:
            items = [merge(v, live[i] if i < len(live) else MISSING, memo) for i, v in enumerate(new)]
            live[:] = items
        elif t is dict or t is defaultdict:
            items = [(merge(k, MISSING, memo), merge(v, live.get(k, MISSING), memo)) for k, v in new.items()]
            live.clear()
            live.update(items)
            if t is defaultdict:
                live.default_factory = new.default_factory
        elif t is set:
            items = [merge(v, MISSING, memo) for v in new]
            live.clear()
            live.update(items)
        else:
            old = vars(live)
            items = {k: merge(v, old.get(k, MISSING), memo) for k, v in vars(new).items()}
            old.clear()
            old.update(items)
        return live
    memo[id(new)] = (new, new)
    # Not merged: still translate what it holds, which may have merged into live objects.
    if t is list:
        new[:] = [merge(v, MISSING, memo) for v in new]
    elif t is tuple:
        out = tuple(merge(v, MISSING, memo) for v in new)
        if any(a is not b for a, b in zip(out, new)):
            memo[id(new)] = (new, out)
            return out
    elif t is dict or t is defaultdict:
        items = [(merge(k, MISSING, memo), merge(v, MISSING, memo)) for k, v in new.items()]
        new.clear()
        new.update(items)
    elif t is set:
        items = [merge(v, MISSING, memo) for v in new]
        new.clear()
        new.update(items)
    elif _mergeable(t):
        d = vars(new)
        for k, v in list(d.items()):
            d[k] = merge(v, MISSING, memo)
    return new
