"""Bad input gets an error naming the value, what is accepted and the fix: before training, or at the call."""
from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import flor_nb as flor
from conftest import SETUP, TRAIN, setup_namespace
from flor_nb import errors


def _record(store, code=TRAIN, name="in", epochs=4, **kw):
    return flor.record(code, name=name, namespace=setup_namespace(epochs), cells=[f"EPOCHS = {epochs}\n{SETUP}"],
                       store=store, overhead=kw.pop("overhead", float("inf")), **kw)


@pytest.mark.parametrize("bad,match", [
    ("flor.log(None, 1.0)", r"flor.log got the name None \(NoneType\): a logged value's name must be a non-empty "
                            r"string, e\.g\. flor\.log\('loss', loss\.item\(\)\)"),
    ("flor.log('hist', {(1, 2): 3})", r"flor.log\('hist', \.\.\.\) cannot store the dict key \(1, 2\) of type tuple.*"
                                      r"keys must be str, int, float, bool or None"),
    ("flor.log('objs', np.array([object()]))", r"cannot store an array of Python objects"),
])
def test_bad_log_stops_at_the_call_and_keeps_what_was_recorded(store, bad, match):
    code = TRAIN.replace("    sched.step()\n", f"    if epoch == 2:\n        {bad}\n    sched.step()\n")
    with pytest.raises(errors.InputError, match=match):
        _record(store, code)
    run = flor.get_run("in", store=store)
    assert run.status == "failed" and run.epochs_completed == 2
    acc = flor.dataframe("acc", run="in", store=store).dropna(subset=["acc"])
    assert acc["epoch"].tolist() == [0, 1]  # nothing recorded is lost
    assert flor.replay("in", epochs="0-1", store=store).attrs["fidelity"]["faithful"]


def test_numpy_hyperparameters_are_kept_and_replayed_as_numpy(store):
    cells = [f"import numpy as np\nEPOCHS = 3\ndecay = flor.arg('decay', np.float32(0.1))\n"
             f"steps = flor.arg('steps', np.int64(2))\n{SETUP}"]
    ns = {"flor": flor, "np": np}
    exec(cells[0], ns)
    code = TRAIN.replace("    sched.step()\n", "    sched.step()\n    flor.log('decay_type', type(decay).__name__)\n")
    run = flor.record(code, name="np_args", namespace=ns, cells=cells, store=store, overhead=float("inf"))
    assert run.status == "finished"
    table = flor.runs(store)
    assert table["arg.decay"].iloc[0] == np.float32(0.1) and table["arg.steps"].iloc[0] == 2
    df = flor.replay("np_args", code=code, epochs=2, store=store)
    assert df.attrs["fidelity"]["faithful"], df.attrs["verdict"]  # decay_type 'float32' reproduced
    assert _record(store, name="after").status == "finished"  # nothing poisons the next record


def test_unstorable_hyperparameter_is_refused_at_the_call(store):
    with pytest.raises(errors.InputError, match=r"flor.arg\('model', \.\.\.\) cannot keep a Linear .*Pass the setting "
                                                r"that builds it"):
        flor.arg("model", __import__("torch").nn.Linear(2, 2))
    assert _record(store).status == "finished"


@pytest.mark.parametrize("kw,match", [
    ({"name": "a@b"}, r"Run name 'a@b' is not allowed: use letters, digits, '_', '-' and '\.'.*NAME@VERSION"),
    ({"name": "../../../x"}, r"Run name '\.\./\.\./\.\./x' is not allowed"),
    ({"name": ""}, r"Run name '' is not allowed"),
    ({"name": "a\0b"}, r"is not allowed"),
    ({"overhead": 0}, r"--overhead 0 is not allowed: give the checkpoint time budget as a fraction of training time "
                      r"above 0, e\.g\. 0\.02 \(2%\), or inf"),
    ({"overhead": float("nan")}, r"--overhead nan is not allowed"),
    ({"overhead": -1.0}, r"--overhead -1\.0 is not allowed"),
])
def test_bad_record_arguments_are_refused_before_anything_is_recorded(store, kw, match):
    with pytest.raises(errors.InputError, match=match):
        _record(store, **kw)
    assert flor.runs(store).empty  # no 'running' row left behind
    assert not (store.home / "checkpoints").exists()


@pytest.mark.parametrize("workers", [-1, 0, 1.5, True])
def test_bad_worker_counts_are_refused(recorded, store, workers):
    with pytest.raises(errors.InputError, match=rf"--workers {workers!r} is not allowed: give a whole number"):
        flor.replay("small", epochs=1, workers=workers, store=store)


def test_huge_epoch_range_is_refused_without_building_it(recorded, store):
    tracemalloc.start()
    t = time.perf_counter()
    with pytest.raises(errors.EpochSpecError, match=r"Epoch 5 is out of range: small@1 completed epochs 0-4"):
        flor.replay("small", epochs="0-99999999999", store=store)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - t < 5 and peak < 50e6
    with pytest.raises(errors.EpochSpecError, match="out of range"):
        flor.replay("small", epochs=range(10 ** 12), store=store)


def test_a_store_path_that_cannot_be_a_store_says_why(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(errors.StoreError, match=r"is a file, not a folder\. Give a folder \(--store PATH"):
        flor.runs(a_file)
    with pytest.raises(errors.StoreError, match=r"Cannot use /proc/flor_store as a flor_nb store: .*Give a folder "
                                                r"you can write to"):
        flor.runs("/proc/flor_store")


@pytest.fixture
def ip(store):
    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext flor_nb")
    yield shell
    shell.run_cell("%unload_ext flor_nb")
    InteractiveShell.clear_instance()


@pytest.mark.parametrize("line,match", [
    ("%flor runs --store 'unclosed", r"Cannot read the %flor line .*No closing quotation\. Quote values with matching"),
    ("%flor runs --store a\0b", r"holds a NUL character \(\\0\) at position 14: remove it"),
])
def test_magic_lines_that_do_not_parse_are_usage_errors(ip, line, match):
    result = ip.run_cell(line)
    error = result.error_in_exec or result.error_before_exec
    assert isinstance(error, UsageError) and __import__("re").search(match, str(error)), error


def test_magic_record_refuses_a_bad_name_before_running(ip, store):
    ip.run_cell(SETUP.replace("flor.arg(\"lr\", 0.1)", "0.1"))
    result = ip.run_cell("%%flor record --name a@b --no-progress\nEPOCHS = 2\n" + TRAIN)
    assert isinstance(result.error_in_exec, UsageError) and "Run name 'a@b' is not allowed" in str(result.error_in_exec)
    assert "history" not in ip.user_ns  # the cell never ran
    assert flor.runs(store).empty
