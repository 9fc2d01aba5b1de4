"""The HF Trainer and Lightning notebooks run in real kernels; a replay in a fresh kernel equals the truth.

Each notebook records a run and replays it with probes. Then a second kernel records the same
notebook with the probe in the model code from the start (the truth), and a third, fresh kernel
replays the first run with the probe: the probe's values must equal the truth's, bit for bit.
"""
from __future__ import annotations

import pathlib

import nbformat
import pytest

from test_notebooks import execute, outputs, text

pytestmark = pytest.mark.slow  # real kernels: `-m "not slow"` skips them locally

ROOT = pathlib.Path(__file__).resolve().parents[1]
new, cell = nbformat.v4.new_notebook, nbformat.v4.new_code_cell


def _cells(nb):
    return [c.source for c in nb.cells if c.cell_type == "code"]


def _fresh_replay_equals_truth(store, tmp_path, nb, *, run, defines, old, new_line, record, replay_cell, frame, name,
                               epochs):
    import pandas as pd

    import flor_nb as flor

    setup = [s for s in _cells(nb) if not s.startswith(("%%flor", "flor.", "run =")) and "%%flor" not in s]
    probed = [s.replace(old, old + new_line) if defines in s else s for s in setup]
    assert probed != setup
    truth = execute(new(cells=[cell(s) for s in probed] + [cell(f"%%flor record --name truth --no-progress\n{record}")]),
                    tmp_path)
    assert "flor_nb: finished truth@1" in text(truth.cells[-1].outputs)
    out = tmp_path / "replayed.pkl"
    fresh = execute(new(cells=[cell("%load_ext flor_nb"), cell(replay_cell),
                               cell(f"{frame}.to_pickle({str(out)!r})\n'model' in dir()")]),
                    tmp_path)
    assert "Faithful replay" in text(fresh.cells[1].outputs), text(fresh.cells[1].outputs)[-3000:]
    assert "False" in text(fresh.cells[2].outputs)  # the fresh kernel's namespace was never touched
    got = pd.read_pickle(out).dropna(subset=[name])
    want = flor.dataframe(name, run="truth", store=store).dropna(subset=[name])
    want = want[want.epoch.isin(epochs)]
    key = ["epoch", "step", "seq"]
    got = got.sort_values(key)[key + [name]].reset_index(drop=True)
    want = want.sort_values(key)[key + [name]].reset_index(drop=True)
    assert len(got) > 0 and got[name].tolist() == want[name].tolist(), (got, want)  # bit for bit
    assert got[key].astype(str).values.tolist() == want[key].astype(str).values.tolist()
    assert set(got.epoch) == set(epochs)


@pytest.mark.timeout(600)
def test_hf_trainer_notebook(store, tmp_path):
    pytest.importorskip("transformers")
    nb = execute(nbformat.read(ROOT / "notebooks" / "hf_trainer.ipynb", as_version=4), tmp_path)
    rec = text(outputs(nb, "%%flor record --name lm"))
    assert "flor_nb: finished lm@1: 4 epochs" in rec, rec[-2000:]
    assert "Not captured" not in rec
    table = text(outputs(nb, 'flor.dataframe("train/loss"'))
    assert "eval/loss" in table
    callback = text(outputs(nb, "class WeightNorm"))
    verdict = "\n".join(line for line in callback.splitlines() if "eplay" in line)  # not the frame's HTML
    assert "Faithful replay: recorded metrics reproduced exactly" in callback, verdict[-3000:]
    assert "train/loss exact (4 values)" in callback and "weight_norm" in callback
    logits = text(outputs(nb, "logit_norm"))
    assert "Faithful replay" in logits and "logit_norm" in logits, logits[-3000:]

    replay_cell = next(s for s in _cells(nb) if "logits = flor.replay" in s)
    _fresh_replay_equals_truth(
        store, tmp_path, nb, run="lm", defines="class LMTrainer", old="num_items_in_batch=num_items_in_batch)\n",
        new_line="        flor.log('logit_norm', outputs.logits.detach().norm().item())\n",
        record="trainer.train()", replay_cell=replay_cell, frame="logits", name="logit_norm", epochs={1})


@pytest.mark.timeout(600)
def test_lightning_notebook(store, tmp_path):
    pytest.importorskip("lightning")
    nb = execute(nbformat.read(ROOT / "notebooks" / "lightning.ipynb", as_version=4), tmp_path)
    rec = text(outputs(nb, "%%flor record --name digits-pl"))
    assert "flor_nb: finished digits-pl@1: 4 epochs" in rec, rec[-2000:]
    assert "Not captured" not in rec
    steps = text(outputs(nb, "logit_std"))
    assert "Faithful replay: recorded metrics reproduced exactly" in steps and "val_acc exact (2 values)" in steps, \
        steps[-3000:]
    callback = text(outputs(nb, "class LR"))
    verdict = "\n".join(line for line in callback.splitlines() if "eplay" in line)
    assert "Faithful replay" in callback and "lr" in callback, verdict[-3000:]

    replay_cell = next(s for s in _cells(nb) if "steps = flor.replay" in s)
    _fresh_replay_equals_truth(
        store, tmp_path, nb, run="digits-pl", defines="class Net", old='        self.log("train_loss", loss)\n',
        new_line="        flor.log('logit_std', logits.detach().std().item())\n",
        record="trainer.fit(model, train, val)", replay_cell=replay_cell, frame="steps", name="logit_std", epochs={1, 3})
