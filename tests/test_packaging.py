"""`pip install .` (a real wheel) and `pip install -e .` both give flor_nb, flor_nb.extension, flor_nb.widgets."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECK = ("import flor_nb, flor_nb.extension, flor_nb.widgets, sys; "
         "print(flor_nb.__file__); print(flor_nb.extension.__file__); print(flor_nb.widgets.__file__); "
         "print(callable(flor_nb.load_ipython_extension), callable(flor_nb.widgets.ui))")


@pytest.mark.timeout(300)
def test_wheel_install(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path / "dist")],
                   check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("flor_nb-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for required in ("flor_nb/__init__.py", "flor_nb/extension/magics.py", "flor_nb/widgets/__init__.py",
                     "flor_nb/frameworks/hf.py", "flor_nb/frameworks/lightning.py"):
        assert required in names
    assert not any(n.startswith(("extension/", "widgets/", "tests/")) for n in names)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, check=True,
                         cwd=tmp_path).stdout.split("\n")
    assert all(line.startswith(str(site)) for line in out[:3]), out
    assert out[3] == "True True"


def test_editable_install_maps_the_folders():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True,
                         cwd="/").stdout.split("\n")
    assert out[1] == str(ROOT / "extension" / "__init__.py") and out[2] == str(ROOT / "widgets" / "__init__.py")


@pytest.mark.timeout(300)
def test_readme_demo_command_without_scikit_learn(tmp_path):
    """The README's first command after a plain `pip install flor_nb` (no scikit-learn): record, replay with a
    probe (faithful), write a report beside the working directory."""
    block = ("import sys, runpy; sys.modules['sklearn'] = None; sys.argv = ['flor_nb.demo', '--epochs', '4', "
             f"'--store', {str(tmp_path / 's')!r}]; runpy.run_module('flor_nb.demo', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=tmp_path, timeout=280)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "scikit-learn is not installed" in out.stdout and "synthetic 8x8 digits" in out.stdout
    assert "flor_nb: finished digits@1: 4 epochs" in out.stdout
    assert "Faithful replay: recorded metrics reproduced exactly" in out.stdout
    assert "Report: flor_reports/digits@1.ipynb" in out.stdout
    assert (tmp_path / "flor_reports" / "digits@1.ipynb").exists() and (tmp_path / "flor_reports" / "digits@1.html").exists()


def test_packaging_metadata():
    """A license file and an SPDX license (no setuptools deprecation warnings); every import declared."""
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "Apache-2.0" and meta["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    deps = " ".join(meta["dependencies"])
    for name in ("jinja2", "anywidget", "torch>=2.3"):
        assert name in deps
    torch = next(d.split("#")[0].strip() for d in meta["dependencies"] if d.startswith("torch"))
    assert f"`{torch}`" in (ROOT / "README.md").read_text(), "the README quotes the torch the package asks for"


NO_CLUSTER = """
import sys
for name in ("distributed", "dask", "s3fs"):  # as if the optional extras were not installed
    sys.modules[name] = None
sys.path.insert(0, {tests!r})
import flor_nb as flor, flor_nb.extension, flor_nb.widgets
from conftest import SETUP, TRAIN, setup_namespace
flor.record(TRAIN, name="plain", namespace=setup_namespace(3), cells=["EPOCHS = 3\\n" + SETUP], overhead=float("inf"))
probe = TRAIN.replace("    sched.step()", "    flor.log('w', weight_norm(model))\\n    sched.step()")
df = flor.replay("plain", code=probe, epochs="1-2", workers=2)
print(df.attrs["fidelity"]["level"], int(df["w"].notna().sum()))
try:
    flor.replay("plain", epochs="1", executor="dask://127.0.0.1:8786")
except flor.FlorError as e:
    print(type(e).__name__, e)
try:
    flor.record(TRAIN, name="s3", namespace=setup_namespace(1), cells=["EPOCHS = 1\\n" + SETUP], blobs="s3://b/p")
    print("recorded without checkpoints")
except flor.FlorError as e:
    print(type(e).__name__, e)
"""


@pytest.mark.timeout(300)
def test_no_cluster_no_cost_without_dask_or_s3fs(store):
    """Dask and s3fs are optional extras: without them flor_nb imports, records and replays on this machine's
    pool, and asking for a cluster or an s3:// location names the extra to install."""
    env = {k: v for k, v in os.environ.items() if k not in ("FLOR_NB_EXECUTOR", "FLOR_NB_BLOBS")}
    out = subprocess.run([sys.executable, "-c", NO_CLUSTER.format(tests=str(ROOT / "tests"))], capture_output=True,
                         text=True, env=env, cwd=store.home.parent, timeout=280)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "faithful 2", out.stdout + out.stderr
    assert lines[1] == "DaskUnavailable Replay on dask://127.0.0.1:8786 needs Dask: pip install 'flor_nb[dask]'."
    assert lines[2].startswith("ObjectStoreError Blob location s3://b/p") and "flor_nb[s3]" in lines[2], lines[2]
    assert "Nothing was recorded" in lines[2]
