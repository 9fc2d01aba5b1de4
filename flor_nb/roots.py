"""The roots of a capture: the names a cell reads or binds and, transitively, the names its code reads."""
from __future__ import annotations

import types
from dataclasses import dataclass, field

from .kinds import CODE


@dataclass
class Scope:
    """Names a cell touches. ``only`` (``--state a,b``) narrows the roots; ``extra`` (``+a,+b``) adds."""

    assigned: set
    free: set
    extra: set = field(default_factory=set)
    only: set | None = None


def _code_names(code: types.CodeType) -> set[str]:
    names, stack = set(), [code]
    while stack:
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return names


def _user_class(cls, ns) -> bool:
    return isinstance(cls, type) and cls.__module__ == ns.get("__name__", "__main__") and ns.get(cls.__name__) is cls


def reads(obj, ns) -> set[str]:
    """Global names that code defined in ``ns`` may read when ``obj`` is called or used."""
    if isinstance(obj, types.MethodType):
        obj = obj.__func__
    if isinstance(obj, types.FunctionType):
        return _code_names(obj.__code__) if obj.__globals__ is ns else set()
    cls = obj if isinstance(obj, type) else type(obj)
    if not _user_class(cls, ns):
        return set()
    names = {cls.__name__}
    for klass in cls.__mro__:
        if not _user_class(klass, ns):
            continue
        for member in vars(klass).values():
            for fn in (member, getattr(member, "__func__", None), getattr(member, "fget", None),
                       getattr(member, "fset", None)):
                if isinstance(fn, types.FunctionType):
                    names |= _code_names(fn.__code__)
    return names


def root_names(ns: dict, scope: Scope) -> tuple[set, set]:
    """(names to capture, names left out by ``--state``): the cell's names and what its code reads."""
    found, queue = set(), list(scope.assigned | scope.free | scope.extra)
    while queue:
        name = queue.pop()
        if name in found or name not in ns or name.startswith("__"):
            continue
        found.add(name)
        queue.extend(n for n in reads(ns[name], ns) if n not in found)
    if scope.only is None:
        return found, set()
    keep = {n for n in (scope.only | scope.extra) if n in ns}
    return keep, {n for n in found - keep if not isinstance(ns[n], CODE)}
