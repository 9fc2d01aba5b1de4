"""The digests that watch values only the probes read (probe_state): each must move when the value moves."""
from __future__ import annotations

import io
import itertools

import torch
from torch.utils.data import DataLoader, TensorDataset

from flor_nb.probe_state import describe, digest


def _cycle(xs):
    while True:
        for x in xs:
            yield x


def _counter():
    i = 0
    while True:
        i += 1
        yield i


def _forever(dl):
    while True:
        yield from dl


def _iterators(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("a\nb\nc\nd\n")
    dl = DataLoader(TensorDataset(torch.arange(8.0)), batch_size=2)
    return {
        "generator over a list": _cycle([torch.randn(3) for _ in range(3)]),
        "generator with a counter": _counter(),
        "generator delegating to a loader": _forever(dl),
        "generator expression": (x * 2 for x in range(9)),
        "list iterator": iter([1, 2, 3, 4]),
        "itertools.cycle": itertools.cycle([1, 2]),
        "itertools.count": itertools.count(),
        "loader iterator": iter(dl),
        "StringIO": io.StringIO("a\nb\nc\n"),
        "file": open(path),
        "zip": zip([1, 2, 3], [4, 5, 6]),
    }


def test_every_kind_of_iterator_a_probe_advances_is_seen_to_move(tmp_path):
    """A generator's digest was its type alone (it cannot be pickled): advancing it changed nothing."""
    for name, it in _iterators(tmp_path).items():
        before = digest(it)
        assert before is not None and digest(it) == before, name
        next(it)
        after = digest(it)
        assert after != before, name
        next(it)
        last = digest(it)
        assert last != after or last.partial, name  # a text file read by next() does not tell its position


def test_a_generator_is_marked_as_seen_in_part_and_an_exhausted_one_is_not(tmp_path):
    """A generator is seen by its frame's instruction and locals, not the loop it is suspended in: a digest that
    did not move may still hide a ``next()``, so it is marked partial, and the verdict names it."""
    its = _iterators(tmp_path)
    assert digest(its["generator over a list"]).partial and digest(its["generator expression"]).partial
    assert not digest(its["list iterator"]).partial and not digest(its["loader iterator"]).partial
    done = (x for x in [])
    list(done)
    assert not digest(done).partial
    assert digest({"a": 1, "gen": its["generator with a counter"]}).partial  # held inside a value
    text = describe({"batches": "partial"}, [3], [3, 4])
    assert "Not seen in full, read by the probes: batches (a generator or iterator" in text
    assert "--epochs 0-4 --workers 1" in text
