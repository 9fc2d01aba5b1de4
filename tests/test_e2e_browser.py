"""End to end in a real browser: JupyterLab (and Notebook 7) run a notebook, the panel replays two epochs.

The server runs from a fixture on 127.0.0.1 with its own config, runtime and
settings folders and its own flor_nb store; Debian's chromium is driven by
Playwright. Screenshots go to the test's tmp folder and to ``out/`` in the repo.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
NOTEBOOK = Path(__file__).parent / "notebooks" / "panel.ipynb"
OUT = Path(__file__).resolve().parents[1] / "out"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]

playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium at /usr/bin/chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(root: Path):
    """No news toast; widget state saved with the notebook (so results survive reopening)."""
    files = {
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                           "checkForUpdates": False},
        "@jupyter-widgets/jupyterlab-manager/plugin.jupyterlab-settings": {"saveState": True},
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A JupyterLab server on 127.0.0.1 serving a copy of the test notebook; stopped at the end."""
    base = tmp_path_factory.mktemp("jupyter")
    root = base / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / "panel.ipynb")
    for name in ("config", "runtime", "settings"):
        (base / name).mkdir()
    _settings(base / "settings")
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(base / "config"), "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(base / "settings"), "FLOR_NB_HOME": str(base / "flor"),
           "JUPYTER_PLATFORM_DIRS": "1", "PYTHONUNBUFFERED": "1"}
    url = f"http://127.0.0.1:{port}"
    with open(base / "server.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
             f"--ServerApp.token={token}", "--ServerApp.allow_root=True", "--LabApp.expose_app_in_browser=True",
             "--JupyterNotebookApp.expose_app_in_browser=True", f"--ServerApp.root_dir={root}",
             "--LabApp.news_url=None"],
            start_new_session=True, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
        try:
            deadline = time.time() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"JupyterLab did not start:\n{(base / 'server.log').read_text()[-3000:]}")
                time.sleep(0.3)
            yield {"url": url, "token": token, "root": root, "log": base / "server.log"}
        finally:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(wait)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def _shot(locator_or_page, tmp_path: Path, name: str, **kw) -> Path:
    path = tmp_path / name
    locator_or_page.screenshot(path=str(path), **kw)
    OUT.mkdir(exist_ok=True)
    shutil.copy(path, OUT / name)
    return path


def _wait_kernel_idle(page, timeout=60_000):
    page.wait_for_function(
        """() => {
            const app = window.jupyterapp; if (!app) return false;
            const w = app.shell.currentWidget;
            const ctx = w && w.sessionContext;
            return !!(ctx && ctx.session && ctx.session.kernel && ctx.kernelDisplayStatus === 'idle');
        }""", timeout=timeout)


def _use_panel(page, tmp_path: Path, prefix: str):
    """Run the notebook, add a preset and a free probe with the panel, replay epochs 2-3, check results."""
    try:
        return _drive_panel(page, tmp_path, prefix)
    except BaseException:
        _shot(page, tmp_path, f"{prefix}-failure.png")
        raise


def _drive_panel(page, tmp_path: Path, prefix: str):
    _wait_kernel_idle(page)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    panel = page.locator(".flor-panel")
    panel.wait_for(state="visible", timeout=90_000)
    page.locator(".flor-panel .flor-status", has_text="demo@").wait_for(timeout=30_000)

    # a preset: gradient norm, placed after loss.backward() by the panel
    page.locator(".flor-panel .flor-kind select").select_option(label="Gradient norm")
    box = page.locator(".flor-panel .flor-code-box textarea")
    page.wait_for_function("el => el.value.includes('grad_norm')", arg=box.element_handle(), timeout=15_000)
    page.locator(".flor-panel button", has_text="Add probe").click()
    page.locator(".flor-panel .flor-probe", has_text="grad_norm").wait_for(timeout=30_000)
    page.wait_for_function("el => el.value === ''", arg=box.element_handle(), timeout=15_000)

    # a free probe after line 7 (opt.step()), typed by the user
    page.locator(".flor-panel .flor-lines select").select_option(index=7)
    box.fill('flor.log("w0", model[0].weight.norm().item())')
    page.locator(".flor-panel button", has_text="Add probe").click()
    page.locator(".flor-panel .flor-probe", has_text="w0").wait_for(timeout=30_000)

    # epochs 2-3 in the list field, then Replay
    epochs = page.locator(".flor-panel .flor-epochs input")
    epochs.fill("2-3")
    epochs.press("Enter")
    page.locator(".flor-panel .flor-estimate", has_text="Replays 2 epochs (2-3)").wait_for(timeout=15_000)
    _shot(panel, tmp_path, f"{prefix}-panel-before-replay.png")
    page.locator(".flor-panel button", has_text="Replay").click()

    table = page.locator(".flor-panel .widget-output table.dataframe")
    table.wait_for(timeout=90_000)
    plot = page.locator(".flor-panel .widget-output img[src^='data:image/png']").first
    plot.wait_for(timeout=30_000)
    page.locator(".flor-panel .flor-verdict", has_text="Faithful").wait_for(timeout=10_000)
    headers = table.locator("th").all_inner_texts()
    assert {"epoch", "step", "grad_norm", "w0", "loss", "acc"} <= set(headers), headers
    assert table.locator("tbody tr").count() == 2 * (8 + 1)  # 8 steps and one epoch row per epoch
    assert plot.evaluate("img => img.naturalWidth") > 200
    _shot(panel, tmp_path, f"{prefix}-panel-results.png")
    return panel


def _api(server, method, path):
    req = urllib.request.Request(f"{server['url']}{path}?token={server['token']}", method=method)
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
    return json.loads(body) if body else None


@pytest.mark.timeout(150)
def test_jupyterlab_panel_replays_two_epochs(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 3600})
    try:
        page.goto(f"{server['url']}/lab/tree/panel.ipynb?token={server['token']}")
        _use_panel(page, tmp_path, "lab")
        _shot(page.locator(".flor-panel .flor-results"), tmp_path, "lab-results.png")
        _shot(page, tmp_path, "lab-page.png")

        # saved with its widget state, the notebook keeps the results (table and PNG) ...
        page.evaluate("window.jupyterapp.commands.execute('docmanager:save')")
        saved = server["root"] / "panel.ipynb"
        deadline, text = time.time() + 20, ""
        while time.time() < deadline and "image/png" not in text:
            time.sleep(0.5)
            nb = json.loads(saved.read_text())
            text = json.dumps(nb.get("metadata", {}).get("widgets", {}))
        assert "image/png" in text and "table class=" in text and "dataframe" in text

        # ... and shows them again after the kernel is gone and the notebook is reopened
        for session in _api(server, "GET", "/api/sessions"):
            if session["path"].endswith("panel.ipynb"):
                _api(server, "DELETE", f"/api/sessions/{session['id']}")
        page.reload()
        page.locator(".flor-panel .widget-output table.dataframe").wait_for(timeout=60_000)
        page.locator(".flor-panel .widget-output img[src^='data:image/png']").first.wait_for(timeout=30_000)
        assert page.locator(".flor-panel .flor-verdict", has_text="Faithful").count() == 1
        _shot(page.locator(".flor-panel"), tmp_path, "lab-reopened.png")
    finally:
        page.close()


@pytest.mark.timeout(150)
def test_notebook7_panel_replays_two_epochs(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 3600})
    try:
        page.goto(f"{server['url']}/notebooks/panel.ipynb?token={server['token']}")
        _use_panel(page, tmp_path, "nb7")
    finally:
        page.close()
