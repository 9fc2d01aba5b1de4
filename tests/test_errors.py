"""Bad input gets a clear, actionable error; faults mid-record keep completed epochs replayable."""
from __future__ import annotations

import errno
import pathlib
import pickle

import pytest

import flor_nb as flor
from conftest import SETUP, TRAIN, setup_namespace
from flor_nb import checkpoint, errors


def test_no_loop(store):
    with pytest.raises(errors.NoLoopError, match="no training loop"):
        flor.record("x = 1\nflor.log('x', x)\n", name="noloop", namespace={"flor": flor}, store=store)
    assert flor.runs(store).empty  # nothing half-created


def test_unknown_run_lists_known(recorded, store):
    with pytest.raises(errors.UnknownRunError, match=r"Known runs: small@1"):
        flor.replay("nope", store=store)
    with pytest.raises(errors.UnknownRunError, match=r"small@9"):
        flor.replay("small@9", store=store)


@pytest.mark.parametrize("spec,match", [
    ("1-x", "Bad epochs '1-x': '1-x' is not an epoch number or a range.*small@1 has epochs 0-4"),
    ("3-", r"the range '3-' has no last epoch \(did you mean 3-4\?\)"),
    ("4-2", "it runs backwards. Write 2-4"),
    ("7", "out of range: small@1 completed epochs 0-4"),
    ("2,5", "Epoch 5 is out of range"),
])
def test_bad_epochs(recorded, store, spec, match):
    with pytest.raises(errors.EpochSpecError, match=match):
        flor.replay("small", epochs=spec, store=store)


def test_probe_syntax_error_points_at_line(recorded, store):
    bad = TRAIN.replace("        opt.step()\n", "        flor.log('gn', grad_norm(model)\n        opt.step()\n")
    with pytest.raises(errors.ProbeSyntaxError) as info:
        flor.replay("small", code=bad, epochs=[1], store=store)
    assert info.value.lineno == bad.splitlines().index("        flor.log('gn', grad_norm(model)") + 1
    assert "line" in str(info.value) and "flor.log('gn'" in str(info.value)


def test_user_error_in_replay_shows_traceback(recorded, store):
    bad = TRAIN.replace("        opt.step()\n", "        flor.log('gn', undefined_name)\n        opt.step()\n")
    with pytest.raises(errors.ReplayError) as info:
        flor.replay("small", code=bad, epochs=[1], store=store)
    text = str(info.value)
    assert "NameError" in text and "undefined_name" in text and "epoch 1, step 0" in text
    assert "<flor replay small@1>" in text


def test_errors_survive_pickling():
    for e in [errors.FlorError("a"), errors.ProbeSyntaxError("bad", 3, "x("), errors.ReplayError("m", "tb"),
              errors.EpochSpecError("e"), errors.NoCheckpointError("n"), errors.UnknownRunError("u")]:
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e)


def _record(store, code, name, epochs=5):
    ns = setup_namespace(epochs)
    return flor.record(code, name=name, namespace=ns, cells=[f"EPOCHS = {epochs}\n{SETUP}"], store=store,
                       overhead=float("inf"))


@pytest.mark.parametrize("exc,status", [(KeyboardInterrupt, "interrupted"), (ValueError, "failed")])
def test_interrupt_mid_record_keeps_completed_epochs(store, exc, status):
    code = TRAIN.replace("    sched.step()\n", f"    if epoch == 3:\n        raise {exc.__name__}('stop')\n    sched.step()\n")
    with pytest.raises(exc):
        _record(store, code, "cut")
    run = flor.get_run("cut", store=store)
    assert run.status == status and run.epochs_completed == 3
    assert status in flor.runs(store)["status"].tolist()
    df = flor.replay("cut", code=code, epochs="0-2", store=store)
    assert df.attrs["fidelity"]["faithful"] and df.attrs["fidelity"]["metrics"]["acc"]["compared"] == 3
    with pytest.raises(errors.EpochSpecError, match="completed epochs 0-2"):
        flor.replay("cut", epochs=3, store=store)


def test_full_disk_keeps_training_and_earlier_checkpoints(store, monkeypatch):
    real = checkpoint.write
    calls = []

    def write(home, rel, snap, **kw):
        calls.append(rel)
        if len(calls) > 5:  # before the loop, then epochs 0 and 1 (step exit + end each) fit; then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(home, rel, snap, **kw)

    monkeypatch.setenv("FLOR_NB_SAVER", "thread")  # the fault is patched into this process
    monkeypatch.setattr(checkpoint, "write", write)
    with pytest.warns(UserWarning, match="checkpoints stopped"):
        run = _record(store, TRAIN, "full")
    monkeypatch.setattr(checkpoint, "write", real)
    assert run.status == "finished" and run.epochs_completed == 5
    assert sorted(store.checkpoints(run.id)) == [-1, 0, 1]
    df = flor.replay("full", epochs=4, store=store)  # from the end of epoch 1, then epochs 2-4
    assert df.attrs["fidelity"]["faithful"]
    seg = df.attrs["fidelity"]["timings"][0]["segment"]
    assert (seg["first"], seg["last"], seg["restore"], seg["modes"]) == (2, 4, 1, {"2": "full", "3": "full", "4": "full"})


def test_no_checkpoint_at_all(store, monkeypatch):
    def write(home, rel, snap, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setenv("FLOR_NB_SAVER", "thread")  # the fault is patched into this process
    monkeypatch.setattr(checkpoint, "write", write)
    with pytest.warns(UserWarning):
        _record(store, TRAIN, "nockpt", epochs=2)
    with pytest.raises(errors.NoCheckpointError, match="No checkpoint before epoch 1"):
        flor.replay("nockpt", epochs=1, store=store)


def test_corrupt_checkpoint_is_reported(recorded, store):
    """The damaged file is named, and replay starts from the nearest earlier intact checkpoint instead."""
    path = store.home / store.checkpoints(recorded.id)[2]["path"]
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"epoch-00002\.step\.ckpt is damaged"):
        df = flor.replay("small", epochs=2, store=store)
    fidelity = df.attrs["fidelity"]
    assert fidelity["faithful"] and list(fidelity["damaged_checkpoints"]) == ["2"]
    assert fidelity["timings"][0]["segment"]["restore"] == 1  # from the end of epoch 1
    assert "Damaged checkpoint of epoch 2 skipped" in df.attrs["verdict"]


def test_break_completes_the_epoch(store):
    code = TRAIN + "    if epoch == 2:\n        break\n"
    run = _record(store, code, "early")
    assert run.status == "finished" and run.epochs_completed == 3
    assert sorted(store.checkpoints(run.id)) == [-1, 0, 1, 2]
    assert flor.replay("early", epochs=2, store=store).attrs["fidelity"]["faithful"]


def test_kernel_death_mid_record_keeps_completed_epochs(store, tmp_path):
    """The process dies (no exception, no cleanup) in epoch 3: epochs already done stay replayable."""
    import subprocess
    import sys

    script = tmp_path / "dies.py"
    script.write_text(
        "import os, sys\nsys.path.insert(0, %r)\nimport flor_nb as flor\n"
        "from conftest import SETUP, TRAIN, setup_namespace\n"
        "code = TRAIN.replace('    sched.step()\\n', '    if epoch == 3:\\n        import time; time.sleep(0.5); os._exit(3)\\n    sched.step()\\n')\n"
        "ns = setup_namespace(6); ns['os'] = os\n"
        "flor.record(code, name='died', namespace=ns, cells=['EPOCHS = 6\\n' + SETUP], store=%r, overhead=float('inf'))\n"
        % (str(pathlib.Path(__file__).parent), str(store.home))
    )
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path)
    assert proc.returncode == 3
    run = flor.get_run("died", store=store)
    assert run.status == "interrupted" and run.epochs_completed == 3
    df = flor.replay("died", epochs="0-2", store=store)
    assert df.attrs["fidelity"]["faithful"] and df.attrs["fidelity"]["metrics"]["acc"]["compared"] == 3


def test_a_loop_counted_from_one_is_told_apart_from_flor_nbs_numbers(store):
    """``for epoch in range(1, EPOCHS + 1)`` prints epochs 1-5 while flor_nb numbers them 0-4: asking for the
    printed epoch 5 must not silently give another one. The plan and the range error say what `epoch` was."""
    code = TRAIN.replace("for epoch in range(EPOCHS):", "for epoch in range(1, EPOCHS + 1):")
    assert code != TRAIN
    from flor_nb.api import summary
    run = _record(store, code, "from1")
    assert "5 epochs in" in summary(run, store) and "(numbered 0-4 in replays; `epoch` = 1-5 in the loop)" in \
        summary(run, store), summary(run, store)
    df = flor.replay("from1", epochs="3-4", store=store)
    plan = df.attrs["fidelity"]["plan"]
    assert "replay 2 epoch(s) (numbered from 0: 3-4, where `epoch` = 4-5) as" in plan, plan
    with pytest.raises(errors.EpochSpecError, match=r"completed epochs 0-4 \(numbered from 0; they are `epoch` = 1-5"):
        flor.replay("from1", epochs=5, store=store)
    import itertools
    from flor_nb.plan import own_range  # which loops have numbers of their own
    assert [own_range(x) for x in (range(1, 6), itertools.count(1), itertools.count(3, 2))] == \
        [[1, 1], [1, 1], [3, 2]]
    assert [own_range(x) for x in (range(5), itertools.count(), itertools.count(0.5), [1, 2])] == [None] * 4
    _record(store, TRAIN, "from0")  # counted from 0: nothing to add
    assert "numbered from 0" not in flor.replay("from0", epochs=1, store=store).attrs["fidelity"]["plan"]
