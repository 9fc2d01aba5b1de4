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
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium at /usr/bin/chromium")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(root: Path, save_widget_state: bool = False):
    """No news toast; widget state saved with the notebook or not (JupyterLab's default: not)."""
    files = {
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                           "checkForUpdates": False},
        "@jupyter-widgets/jupyterlab-manager/plugin.jupyterlab-settings": {"saveState": save_widget_state},
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
            yield {"url": url, "token": token, "root": root, "log": base / "server.log", "settings": base / "settings"}
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
    if hasattr(locator_or_page, "scroll_into_view_if_needed"):
        # An element: bring its top to the top of the notebook's own scroller, then shoot that part of the viewport.
        # A plain element shot of a tall element reaches past the viewport, and Chromium captures that by resizing
        # the view: Notebook 7 re-lays out (after a theme change above all) and the shot showed a cut-off panel.
        locator_or_page.evaluate("""e => { let p = e.parentElement;
            while (p && !(p.scrollHeight > p.clientHeight + 1 && ['auto', 'scroll'].includes(getComputedStyle(p).overflowY)))
                p = p.parentElement;
            if (p) p.scrollTop += e.getBoundingClientRect().top - p.getBoundingClientRect().top; }""")
        box, view = locator_or_page.bounding_box(), locator_or_page.page.viewport_size
        if box and box["y"] >= 0 and box["y"] + box["height"] <= view["height"]:
            locator_or_page.page.screenshot(path=str(path), clip=box, **kw)
        else:
            locator_or_page.screenshot(path=str(path), **kw)
    else:
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
    # a second front end on the same store records demo@2, which takes over demo@1's probes: start afresh
    probes = page.locator(".flor-panel .flor-probe")
    for n in range(probes.count(), 0, -1):
        page.locator(".flor-panel .widget-hbox", has=page.locator(".flor-probe")).last.locator(
            "button", has_text="Remove").click()
        page.wait_for_function(f"() => document.querySelectorAll('.flor-panel .flor-probe').length === {n - 1}",
                               timeout=15_000)

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

    # epochs 2-3: a drag across them on the curve
    svg = page.locator(".flor-panel .flor-curve svg")
    start, end = _epoch_x(svg, 2, 3), _epoch_x(svg, 3, 3)
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=5)
    page.mouse.up()
    page.locator(".flor-panel .flor-estimate", has_text="Replays 2 epochs (2-3)").wait_for(timeout=15_000)
    assert page.locator(".flor-panel .flor-epochs input").input_value() == "2-3"
    _shot(panel, tmp_path, f"{prefix}-panel-before-replay.png")
    page.locator(".flor-panel button", has_text="Replay").first.click()

    table = page.locator(".flor-panel .widget-output table.dataframe")
    table.wait_for(timeout=90_000)
    plot = page.locator(".flor-panel .widget-output img[src^='data:image/png']").first
    plot.wait_for(timeout=30_000)
    page.locator(".flor-panel .flor-verdict", has_text="Faithful").wait_for(timeout=10_000)
    page.locator(".flor-panel .flor-outcome .flor-badge.ok", has_text="faithful").wait_for(timeout=10_000)
    # grouped: the epoch-level values first (one row per epoch), then the steps on demand
    headers = table.locator("th").all_inner_texts()
    assert [h.strip() for h in headers] == ["epoch", "acc"], headers
    assert table.locator("tbody tr").count() == 2
    page.locator(".flor-panel .flor-results button", has_text="per step").click()
    page.wait_for_function("() => document.querySelectorAll('.flor-panel .widget-output table.dataframe tbody tr')"
                           ".length === 16", timeout=15_000)
    headers = {h.strip(" \u25c6") for h in table.locator("th").all_inner_texts()}
    assert {"epoch", "step", "grad_norm", "w0", "loss"} == headers, headers
    assert plot.evaluate("img => img.naturalWidth") > 200
    bars = _scrollbars(page)
    assert bars == [], bars
    _unclipped(page)
    _full_height(page)
    _shot(panel, tmp_path, f"{prefix}-panel-results.png")
    return panel


def _epoch_x(svg, epoch: int, last: int) -> tuple[float, float]:
    """Page coordinates of an epoch on the curve (the SVG's plot area spans x 58..706 of 720)."""
    box = svg.bounding_box()
    x = 58 + epoch * (720 - 58 - 14) / last
    return box["x"] + x / 720 * box["width"], box["y"] + box["height"] * 0.4


def _scrollbars(page) -> list[str]:
    """Elements inside the panel that scroll sideways (a wide table inside its own box is allowed)."""
    return page.evaluate("""() => [...document.querySelectorAll('.flor-panel *')]
        .filter(e => e.scrollWidth > e.clientWidth + 1 && ['auto', 'scroll'].includes(getComputedStyle(e).overflowX))
        .filter(e => !e.classList.contains('flor-table-wrap'))
        .map(e => { const r = e.getBoundingClientRect(); const wide = [...e.querySelectorAll('*')]
            .filter(c => c.getBoundingClientRect().right > r.right + 1).slice(-1)[0];
            return e.tagName + '.' + [...e.classList].join('.') + ` ${e.scrollWidth}>${e.clientWidth} because `
                + (wide ? wide.tagName + '.' + [...wide.classList].join('.') + ' ' + wide.getBoundingClientRect().right
                   + '>' + r.right : '?'); })""")


def _error_next_to_the_button(page, tmp_path: Path, prefix: str):
    """A probe that raises in epoch 2: the traceback shows right under the Replay button, marked failed."""
    box = page.locator(".flor-panel .flor-code-box textarea")
    page.locator(".flor-panel .flor-lines select").select_option(index=10)
    box.fill('flor.log("ratio", acc / (epoch - 2))')
    page.locator(".flor-panel button", has_text="Add probe").click()
    page.locator(".flor-panel .flor-probe", has_text="ratio").wait_for(timeout=30_000)
    epochs = page.locator(".flor-panel .flor-epochs input")
    epochs.fill("2")
    epochs.press("Enter")
    page.locator(".flor-panel .flor-estimate", has_text="Replays 1 epoch (2)").wait_for(timeout=15_000)
    page.locator(".flor-panel button", has_text="Replay").first.click()
    error = page.locator(".flor-panel .flor-replay-msg .flor-error", has_text="ZeroDivisionError")
    error.wait_for(timeout=90_000)
    page.locator(".flor-panel .flor-outcome .flor-badge.bad", has_text="failed in epoch 2").wait_for(timeout=10_000)
    button = page.locator(".flor-panel button", has_text="Replay").first.bounding_box()
    where = error.bounding_box()
    assert 0 <= where["y"] - (button["y"] + button["height"]) < 120, (button, where)
    _shot(page.locator(".flor-panel .flor-replay-msg").locator(".."), tmp_path, f"{prefix}-error-at-button.png")
    _in_dark(page, page.locator(".flor-panel .flor-replay-msg").locator(".."), tmp_path,
             f"{prefix}-error-at-button-dark.png", texts=[".flor-panel .flor-replay-msg .flor-error"])
    row = page.locator(".flor-panel .widget-hbox", has=page.locator(".flor-probe", has_text="ratio")).last
    row.locator("button", has_text="Remove").click()
    page.locator(".flor-panel .flor-probe", has_text="ratio").wait_for(state="detached", timeout=30_000)


def _contrast(locator) -> float:
    """WCAG contrast of an element's text against the first opaque background behind it."""
    return locator.evaluate("""el => {
        const rgba = c => { const m = c.match(/[\\d.]+/g).map(Number); return m.length > 3 ? m : [...m, 1]; };
        const lum = ([r, g, b]) => { const f = v => { v /= 255; return v <= 0.03928 ? v / 12.92
            : Math.pow((v + 0.055) / 1.055, 2.4); }; return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
        let node = el, bg = null;
        while (node && node.nodeType === 1) {
            const c = rgba(getComputedStyle(node).backgroundColor);
            if (c[3] > 0.99) { bg = c; break; }
            node = node.parentElement;
        }
        bg = bg || [255, 255, 255, 1];
        const fg = rgba(getComputedStyle(el).color);
        const mix = fg.slice(0, 3).map((v, i) => v * fg[3] + bg[i] * (1 - fg[3]));
        const [a, b] = [lum(mix), lum(bg)].sort((x, y) => y - x);
        return (a + 0.05) / (b + 0.05);
    }""")


def _plot_luminance(locator, tmp_path: Path, name: str) -> float:
    from PIL import Image, ImageStat

    path = _shot(locator, tmp_path, name)
    return ImageStat.Stat(Image.open(path).convert("L")).mean[0]


def _dark_theme(page, tmp_path: Path, prefix: str):
    """In the dark theme: probe headers readable (WCAG >= 4.5), plots dark, not white blocks."""
    plot = page.locator(".flor-panel .flor-plot img[src^='data:image/png']").first
    light = _plot_luminance(plot, tmp_path, f"{prefix}-plot-light.png")
    corner = plot.evaluate("""img => { const c = document.createElement('canvas'); c.width = img.naturalWidth;
        c.height = img.naturalHeight; const x = c.getContext('2d'); x.drawImage(img, 0, 0);
        return x.getImageData(2, 2, 1, 1).data[3]; }""")
    assert corner == 0, "plot backgrounds are transparent"
    page.evaluate("window.jupyterapp.commands.execute('apputils:change-theme', {theme: 'JupyterLab Dark'})")
    page.wait_for_function("() => document.body.dataset.jpThemeLight === 'false'", timeout=30_000)
    page.wait_for_timeout(1000)
    header = page.locator(".flor-panel table.dataframe th.probe").first
    assert _contrast(header) >= 4.5, _contrast(header)
    for selector in (".flor-panel .flor-verdict", ".flor-panel .flor-estimate", ".flor-panel .flor-status"):
        assert _contrast(page.locator(selector).first) >= 4.5, selector
    assert "invert" in plot.evaluate("img => getComputedStyle(img).filter")
    dark = _plot_luminance(plot, tmp_path, f"{prefix}-plot-dark.png")
    assert light > 180 and dark < 80, (light, dark)
    _shot(page.locator(".flor-panel"), tmp_path, f"{prefix}-panel-dark.png")
    _shot(page.locator(".flor-panel .flor-results"), tmp_path, f"{prefix}-results-dark.png")
    page.evaluate("window.jupyterapp.commands.execute('apputils:change-theme', {theme: 'JupyterLab Light'})")
    page.wait_for_function("() => document.body.dataset.jpThemeLight === 'true'", timeout=30_000)


def _in_dark(page, locator, tmp_path: Path, name: str, texts=()):
    """Shoot ``locator`` in JupyterLab Dark too (the done-means asks for each state light and dark); the text of
    ``texts`` (selectors) must stay readable there (WCAG >= 4.5). Back to the light theme after."""
    page.evaluate("window.jupyterapp.commands.execute('apputils:change-theme', {theme: 'JupyterLab Dark'})")
    page.wait_for_function("() => document.body.dataset.jpThemeLight === 'false'", timeout=30_000)
    page.wait_for_timeout(1000)
    try:
        for selector in texts:
            ratio = _contrast(page.locator(selector).first)
            assert ratio >= 4.5, (selector, ratio)
        _shot(locator, tmp_path, name)
    finally:
        page.evaluate("window.jupyterapp.commands.execute('apputils:change-theme', {theme: 'JupyterLab Light'})")
        page.wait_for_function("() => document.body.dataset.jpThemeLight === 'true'", timeout=30_000)


def _full_height(page):
    """Notebook 7 squeezes an output taller than ~1,800 px into a 24em scroll box (autoScrollOutputs), and checks
    again at every output change: once the static copy has followed the results, the panel keeps its height."""
    page.wait_for_function("""() => [...document.querySelectorAll('.flor-static')].some(s => s.textContent
        .includes('Faithful replay'))""", timeout=30_000)
    page.wait_for_timeout(500)
    box = page.evaluate("""() => { const p = document.querySelector('.flor-panel'), o = p.closest('.jp-OutputArea');
        return [o.getBoundingClientRect().height, p.getBoundingClientRect().height, getComputedStyle(o).maxHeight,
                o.closest('.jp-CodeCell').className]; }""")
    assert box[0] >= box[1] and box[2] == "none", box


def _unclipped(page):
    """The runs list and the code listing keep their right border inside the panel (a 100%-wide widget plus its
    margin used to be cut off by the panel's overflow-x: hidden)."""
    cut = page.evaluate("""() => [...document.querySelectorAll('.flor-panel .flor-runs, .flor-panel .flor-lines')]
        .map(e => { let p = e.parentElement; while (p && getComputedStyle(p).overflowX !== 'hidden')
            p = p.parentElement; const r = e.getBoundingClientRect(), q = p.getBoundingClientRect();
            return [e.className, r.right, q.right - parseFloat(getComputedStyle(p).borderRightWidth)]; })
        .filter(([, right, edge]) => right > edge + 0.5)""")
    assert cut == [], cut


def _cancel_keeps_finished_epochs(page, tmp_path: Path, prefix: str):
    """The slow run: cancel once epoch 0's segment is kept; its values show under a partial-results banner."""
    page.locator(".flor-panel .flor-runs select option", has_text="slow@1").click()
    page.locator(".flor-panel .flor-status", has_text="slow@1").wait_for(timeout=30_000)
    epochs = page.locator(".flor-panel .flor-epochs input")
    epochs.fill("0,2-4")
    epochs.press("Enter")
    page.locator(".flor-panel .flor-estimate", has_text="Replays 4 epochs (0, 2-4)").wait_for(timeout=15_000)
    page.locator(".flor-panel button", has_text="Replay").first.click()
    page.locator(".flor-panel .flor-chips span.done", has_text="epoch 0").wait_for(timeout=90_000)
    page.locator(".flor-panel button", has_text="Cancel").click()
    banner = page.locator(".flor-panel .flor-verdict.warn", has_text="Cancelled: partial results for epoch 0")
    banner.wait_for(timeout=60_000)
    assert page.locator(".flor-panel .flor-verdict.ok").count() == 0
    page.locator(".flor-panel .flor-outcome .flor-badge.warn", has_text="partial").wait_for(timeout=10_000)
    rows = page.locator(".flor-panel .widget-output table.dataframe tbody tr")
    assert rows.count() == 1 and rows.first.locator("td").first.inner_text() == "0"
    assert page.locator(".flor-panel .flor-chips span.lost").count() >= 1
    _shot(page.locator(".flor-panel .flor-results").locator(".."), tmp_path, f"{prefix}-cancelled.png")
    _in_dark(page, page.locator(".flor-panel .flor-results").locator(".."), tmp_path, f"{prefix}-cancelled-dark.png",
             texts=[".flor-panel .flor-verdict.warn", ".flor-panel .flor-chips span.lost"])


def _report_from_the_file_browser(page, server, tmp_path: Path):
    """Write report -> a link in the panel, and flor_reports/ in the file browser opens the report."""
    page.locator(".flor-panel .flor-runs select option", has_text="demo@1").click()
    page.locator(".flor-panel .flor-status", has_text="demo@1").wait_for(timeout=30_000)
    link = page.locator(".flor-panel a.flor-report-link")
    for attempt in range(2):
        # The run switch above re-renders the panel; on a loaded machine a click landing mid re-render is
        # lost (CI, 23:51 UTC: the button kept its focus ring, the kernel stayed idle, no report was written).
        page.locator(".flor-panel button", has_text="Write report").click()
        try:
            link.wait_for(timeout=45_000 if attempt == 0 else 60_000)
            break
        except playwright_api.TimeoutError:
            if attempt == 1:
                raise
    assert link.get_attribute("href") == "flor_reports/demo@1.ipynb"
    assert (server["root"] / "flor_reports" / "demo@1.html").exists()
    page.evaluate("window.jupyterapp.commands.execute('filebrowser:activate')")
    page.evaluate("window.jupyterapp.commands.execute('filebrowser:go-to-path', {path: '/'})")
    folder = page.locator(".jp-DirListing-item", has_text="flor_reports")
    folder.wait_for(timeout=30_000)
    folder.dblclick()
    item = page.locator(".jp-DirListing-item", has_text="demo@1.ipynb")
    item.wait_for(timeout=30_000)
    item.dblclick()
    report = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-RenderedMarkdown h1",
                          has_text="Run report: demo@1")
    report.wait_for(timeout=60_000)
    page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-RenderedMarkdown h2", has_text="Checkpoints").wait_for(
        timeout=60_000)
    page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output img").first.wait_for(timeout=30_000)
    _shot(page, tmp_path, "lab-report-opened.png")
    page.evaluate("window.jupyterapp.commands.execute('application:close')")  # back to panel.ipynb
    discard = page.locator(".jp-Dialog button", has_text="Discard")
    try:
        discard.click(timeout=3000)
    except playwright_api.TimeoutError:
        pass
    page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .flor-panel").wait_for(timeout=30_000)


def _static_after_shutdown(page, server, tmp_path: Path, prefix: str, expect: str):
    """Widget state not saved (JupyterLab's default): after shutdown and reload the static copy remains."""
    saved = server["root"] / "panel.ipynb"
    deadline, text = time.time() + 30, ""
    while time.time() < deadline and not ("flor-static" in text and expect in text):
        # the static copy is updated right after the panel (its plots take a moment): save until it is in
        page.evaluate("window.jupyterapp.commands.execute('docmanager:save')")
        time.sleep(1)
        text = saved.read_text()
    nb = json.loads(text)
    assert "application/vnd.jupyter.widget-state+json" not in json.dumps(nb.get("metadata", {}))
    assert "flor-static" in text and "table class=" in text and expect in text
    for session in _api(server, "GET", "/api/sessions"):
        if session["path"].endswith("panel.ipynb"):
            _api(server, "DELETE", f"/api/sessions/{session['id']}")
    page.reload()
    static = page.locator(".flor-static")
    static.wait_for(state="visible", timeout=60_000)
    assert static.locator("table.dataframe").count() >= 1 and static.locator("img.flor-plot").count() >= 1
    assert expect in static.inner_text()
    _shot(static, tmp_path, f"{prefix}-static-after-reload.png")
    _in_dark(page, static, tmp_path, f"{prefix}-static-after-reload-dark.png",
             texts=[".flor-static .flor-verdict", ".flor-static table.dataframe th"])


def _api(server, method, path):
    req = urllib.request.Request(f"{server['url']}{path}?token={server['token']}", method=method)
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
    return json.loads(body) if body else None


@pytest.mark.timeout(300)
def test_jupyterlab_panel_journey(server, browser, tmp_path):
    """Record -> panel -> replay -> error -> dark theme -> cancel -> report -> save, shut down, reload."""
    page = browser.new_page(viewport={"width": 1400, "height": 3600})
    try:
        page.goto(f"{server['url']}/lab/tree/panel.ipynb?token={server['token']}")
        _use_panel(page, tmp_path, "lab")
        _dark_theme(page, tmp_path, "lab")
        _error_next_to_the_button(page, tmp_path, "lab")
        _cancel_keeps_finished_epochs(page, tmp_path, "lab")
        _report_from_the_file_browser(page, server, tmp_path)
        _static_after_shutdown(page, server, tmp_path, "lab", expect="Faithful replay")
    except BaseException:
        _shot(page, tmp_path, "lab-failure.png")
        raise
    finally:
        page.close()


@pytest.mark.timeout(240)
def test_notebook7_panel_journey(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 3600})
    try:
        page.goto(f"{server['url']}/notebooks/panel.ipynb?token={server['token']}")
        _use_panel(page, tmp_path, "nb7")
        _dark_theme(page, tmp_path, "nb7")
        _error_next_to_the_button(page, tmp_path, "nb7")
        _cancel_keeps_finished_epochs(page, tmp_path, "nb7")
        _static_after_shutdown(page, server, tmp_path, "nb7", expect="Cancelled: partial results for epoch 0")
    except BaseException:
        _shot(page, tmp_path, "nb7-failure.png")
        raise
    finally:
        page.close()
