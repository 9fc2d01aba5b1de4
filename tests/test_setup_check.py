"""Digests of the values a replay rebuilds (setup_check): each kind compares with its own encoding."""
from __future__ import annotations

from flor_nb import setup_check


def test_runs_recorded_before_packed_rows_compare_by_the_encoding_they_were_recorded_with():
    """Kind "v2" packs long lists of rows of numbers (a dataset built in Python); runs recorded before it hold
    "v" digests of the same values one row at a time. Neither may read as a difference, and both see one."""
    ns = {"rows": [[i, i + 1, i + 2] for i in range(100)]}
    code = "print(rows)\n"
    old = {"rows": [1, setup_check.digest(ns["rows"], named={}), "v"]}
    new = {"rows": [1, setup_check.digest(ns["rows"], named={}, rows=True), "v2"]}
    assert old["rows"][1] != new["rows"][1]
    assert setup_check.compare(ns, code, old, roots=set()) == {}
    assert setup_check.compare(ns, code, new, roots=set()) == {}
    ns["rows"][3][1] = -1
    assert setup_check.compare(ns, code, old, roots=set())["rows"].startswith("differs")
    assert setup_check.compare(ns, code, new, roots=set())["rows"].startswith("differs")


def test_packed_rows_tell_lengths_kinds_and_values_apart():
    rows = [[i, i + 1, i + 2] for i in range(100)]
    base = setup_check.digest(rows, rows=True)
    variants = {
        "a value": [r if i != 9 else [r[0], r[1] + 1, r[2]] for i, r in enumerate(rows)],
        "a row's length": [r if i != 9 else r + [0] for i, r in enumerate(rows)],
        "moved between rows": [rows[0][:2], [rows[0][2]] + rows[1]] + rows[2:],
        "tuples for lists": [tuple(r) for r in rows],
        "floats for ints": [[float(v) for v in r] for r in rows],
    }
    for what, other in variants.items():
        assert setup_check.digest(other, rows=True) != base, what
    assert setup_check.digest([list(r) for r in rows], rows=True) == base  # copies: the same value


def test_rows_too_many_to_pack_are_left_to_the_walk_and_its_deadline():
    """A tokenized corpus as a list of lists (1.2M rows of 4) is not copied whole to be packed: the walk takes it
    and stops at the record's deadline, as before packing existed."""
    import time
    rows = [[1, 2, 3, 4]] * 1_200_000
    t = time.perf_counter()
    assert setup_check.digest(rows, time.perf_counter() + 0.05, rows=True) is None
    assert time.perf_counter() - t < 1.0
