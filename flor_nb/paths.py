"""Paths that name objects in the notebook namespace (``trainer.model``, ``log['hist']``) and finding them."""
from __future__ import annotations

import ast
import re


def root(path: str) -> str:
    """The namespace name a path starts from: ``model`` for ``model.fc.weight``, ``log`` for ``log['hist']``."""
    for i, ch in enumerate(path):
        if ch in ".[":
            return path[:i]
    return path


def child_path(path: str, key) -> str:
    """``path.key`` for an attribute (digits too: ``model.0`` in a Sequential), else ``path['key']``."""
    if isinstance(key, str) and _ATTR.fullmatch(key):
        return f"{path}.{key}"
    return f"{path}[{key!r}]"


def attr_path(path: str, dotted: str) -> str:
    """``model`` + ``encoder.layers.0`` -> ``model.encoder.layers.0``."""
    for part in dotted.split(".") if dotted else ():
        path = child_path(path, part)
    return path


def item_path(path: str, key) -> str:
    if type(key) in (str, int, bool, float) or key is None:
        return f"{path}[{key!r}]"
    return f"{path}[#{type(key).__name__}]"


_ATTR = re.compile(r"[A-Za-z0-9_]+")
_PART = re.compile(r"\.([A-Za-z0-9_]+)|\[((?:'[^']*'|\"[^\"]*\"|[^\]])*)\]")


def resolve(ns: dict, path: str):
    """The object at ``path`` (``a.b[0]['k']``) in ``ns``; raises LookupError when it is not there."""
    m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", path)
    if m is None or m.group(0) not in ns:
        raise LookupError(path)
    obj, pos = ns[m.group(0)], m.end()
    while pos < len(path):
        m = _PART.match(path, pos)
        if m is None:
            raise LookupError(path)
        try:
            if m.group(1) is not None:
                obj = getattr(obj, m.group(1))
            else:
                obj = obj[ast.literal_eval(m.group(2))]
        except (AttributeError, KeyError, IndexError, TypeError, ValueError, SyntaxError):
            raise LookupError(path) from None
        pos = m.end()
    return obj
