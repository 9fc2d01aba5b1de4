"""Python's string hashing, which differs from process to process unless ``PYTHONHASHSEED`` is set.

A replay runs in another process than the recording. Code whose results depend on ``hash()`` of a str or
bytes (minGPT's demo splits its sort dataset by ``hash(pickle.dumps(...)) % 4``), or on the order of a set of
strings (``list(set(text))`` as a vocabulary), then computes other values there, and nothing a checkpoint can
hold brings the recording's seed back. This module says when that can happen: at record time for code that
calls ``hash()``, and as a possible cause when a replay diverges.
"""
from __future__ import annotations

import ast
import os
import sys

_FIX = ("set PYTHONHASHSEED=0 in the kernel's environment (the kernelspec's \"env\", or start Jupyter with it) "
        "and record again")


def environment() -> dict:
    """How this process hashes strings: stored with a run (``env["hashseed"]``)."""
    return {"seed": os.environ.get("PYTHONHASHSEED"), "randomized": bool(sys.flags.hash_randomization)}


def random_in(env: dict | None) -> bool:
    """Whether the process ``env`` describes hashed strings with a seed no other process has."""
    return bool(env) and env.get("randomized", False)


def _trees(sources):
    for label, source in sources:
        try:
            yield label, ast.parse(source)
        except SyntaxError:
            continue


def hash_calls(sources) -> list[str]:
    """'In[N] line L' for each call of the builtin ``hash`` in ``sources`` ([(label, source)])."""
    found = []
    for label, tree in _trees(sources):
        lines = sorted({n.lineno for n in ast.walk(tree)
                        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "hash"})
        found += [f"{label} line {n}" for n in lines]
    return found


def unordered_sets(sources) -> list[str]:
    """'In[N] line L' for each set built and not sorted on the spot (``list(set(text))``): iterating it follows
    the string hashes. ``sorted(list(set(text)))`` and ``x in {"a", "b"}`` are not listed."""
    found = []
    for label, tree in _trees(sources):
        ordered = {id(x) for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                   and n.func.id == "sorted" for a in n.args for x in ast.walk(a)}  # sorted(list(set(words)))
        ordered |= {id(c) for n in ast.walk(tree) if isinstance(n, ast.Compare)  # x in {...}: membership only
                    for op, c in zip(n.ops, n.comparators) if isinstance(op, (ast.In, ast.NotIn))}
        lines = sorted({n.lineno for n in ast.walk(tree) if id(n) not in ordered and (
            isinstance(n, (ast.Set, ast.SetComp)) or isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
            and n.func.id in ("set", "frozenset"))})
        found += [f"{label} line {n}" for n in lines]
    return found


def _lines(found: list[str]) -> str:
    return ", ".join(found[:4]) + (" ..." if len(found) > 4 else "")


def record_warning(sources) -> str | None:
    """What to tell the user before training, when the code calls ``hash()`` and this kernel's seed is random."""
    if not random_in(environment()):
        return None
    calls = hash_calls(sources)
    if not calls:
        return None
    where = ", ".join(calls[:4]) + (" ..." if len(calls) > 4 else "")
    return (f"{where} calls hash(), and Python hashes strings and bytes with a random seed in each process "
            "(PYTHONHASHSEED is not set). A replay runs in another process, so what depends on those hashes will "
            f"differ there and the replay cannot reproduce this recording. To record reproducibly, {_FIX}.")


def divergence_cause(recorded: dict | None, sources) -> str | None:
    """A possible cause for a replay that diverged: the code depends on string hashes (it calls ``hash()`` or
    iterates a set it built) and this process cannot hash as the recording's did."""
    if not recorded:  # a run recorded before flor_nb stored it
        return None
    here = environment()
    if random_in(recorded):
        why = "the recording kernel hashed strings with a random seed (PYTHONHASHSEED was not set)"
    elif (recorded.get("seed"), recorded.get("randomized")) != (here["seed"], here["randomized"]):
        why = (f"the recording kernel ran with PYTHONHASHSEED={recorded.get('seed')} and this one with "
               f"PYTHONHASHSEED={here['seed'] or 'unset'}")
    else:
        return None
    calls, sets = hash_calls(sources), unordered_sets(sources)
    if not calls and not sets:
        return None
    uses = " and ".join(([f"calls hash() ({_lines(calls)})"] if calls else [])
                        + ([f"iterates sets it builds ({_lines(sets)})"] if sets else []))
    fix = _FIX if random_in(recorded) else "replay from a kernel started with the recorded PYTHONHASHSEED"
    return (f"the recorded code {uses}, and {why}: what depends on string hashes comes out differently in the "
            f"replay's process; to make it reproducible, {fix}")
