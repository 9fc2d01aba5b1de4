"""The shapes of training code people write, as notebooks in notebooks/, on real kernels.

Each notebook records its training cell and replays it with probes. The test runs it as a user
would, then replays in a fresh kernel and compares every probe value, bit for bit, with a run
that had the probes from the start (recorded in a third kernel).
"""
from __future__ import annotations

import copy
import pathlib
import re

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

import flor_nb as flor

pytestmark = pytest.mark.slow  # real kernels: `-m "not slow"` skips them locally

ROOT = pathlib.Path(__file__).resolve().parents[1]


def execute(cells, cwd):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) if isinstance(c, str) else c for c in cells])
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def text(cell) -> str:
    return "\n".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in cell.outputs)


def tagged(nb, tag):
    return next((c for c in nb.cells if tag in c.metadata.get("tags", [])), None)


def logged(source: str) -> set[str]:
    return set(re.findall(r"flor\.log\('([^']+)'", source)) | set(re.findall(r'flor\.log\("([^"]+)"', source))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("notebook", ["while_loop.ipynb", "step_loop.ipynb", "helper_loop.ipynb"])
def test_shape_replays_like_a_run_with_the_probes_from_the_start(store, tmp_path, notebook):
    nb = nbformat.read(ROOT / "notebooks" / notebook, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    record, replay = tagged(nb, "record"), tagged(nb, "replay")
    helper, edited = tagged(nb, "helper"), tagged(nb, "edited-helper")
    line, body = replay.source.split("\n", 1)
    name, spec = re.match(r"%%flor replay (\w+) --(?:iters|epochs) ([\d-]+)", line).groups()
    lo, hi = (int(x) for x in (spec.split("-") + [spec])[:2])

    # 1. As a user runs it: record, then replay in the same kernel.
    ran = execute(copy.deepcopy(code), tmp_path)
    out = text(next(c for c in ran.cells if "replay" in c.metadata.get("tags", [])))
    assert "Faithful replay" in out, out
    assert "Not captured" not in text(next(c for c in ran.cells if "record" in c.metadata.get("tags", [])))

    # 2. The truth: the same setup, the probes in the loop (and the helper) from the start.
    before = [c for c in code[:code.index(record)] if c is not helper]
    if edited is not None:
        before.append(edited)
    execute([*[c.source for c in before], f"%%flor record --name truth --no-progress\n{body}"], tmp_path)

    # 3. A fresh kernel: only the edited helper (if any) and the replay cell.
    pkl = tmp_path / "replayed.pkl"
    fresh = execute(["%load_ext flor_nb", *([edited.source] if edited is not None else []),
                     replay.source.replace(line, line + " --no-progress"), f"_.to_pickle({str(pkl)!r})"], tmp_path)
    verdict = text(fresh.cells[-2])
    assert "Faithful replay" in verdict, verdict
    probes = sorted((logged(body) | logged(edited.source if edited is not None else ""))
                    - (logged(record.source) | logged(helper.source if helper is not None else "")))
    got = pd.read_pickle(pkl)
    want = flor.dataframe(*probes, run="truth", store=store)
    key = ["epoch", "step", "seq"]

    def values(frame):
        rows = frame[(frame["epoch"] >= lo) & (frame["epoch"] <= hi)].dropna(subset=probes, how="all")
        return {tuple(None if pd.isna(r[k]) else int(r[k]) for k in key): tuple(r[p] for p in probes)
                for _, r in rows.iterrows()}

    expected = values(want)
    assert len(expected) >= hi - lo + 1 and values(got) == expected  # every probe value, bit for bit
