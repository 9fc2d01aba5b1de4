"""Run reports: a validated notebook with embedded outputs that re-executes to the same tables,
and a self-contained HTML page that shows its plots and keeps logged strings inert."""
from __future__ import annotations

import base64
import shutil
import struct
from pathlib import Path

import nbformat
import pytest
from conftest import SETUP, TRAIN, record_with_a_lock, setup_namespace

import flor_nb as flor
from flor_nb.errors import FlorError

HOSTILE = "<script>window.__pwned=1</script>"
PROBE = TRAIN.replace("opt.step()", "flor.log('gn', grad_norm(model)); opt.step()")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture
def history(recorded, store):
    """small@1 (5 epochs) with a probe replayed for epochs 1-2; small@2 (3 epochs) logs a hostile string."""
    flor.replay("small", code=PROBE, epochs="1-2", store=store)
    ns = setup_namespace(3)
    code = TRAIN + f"    flor.log('note', {HOSTILE!r})\n"
    flor.record(code, name="small", namespace=ns, cells=[f"EPOCHS = 3\n{SETUP}"], store=store, overhead=float("inf"))
    return store


def _outputs(nb):
    return [(i, o) for i, c in enumerate(nb.cells) if c.cell_type == "code" for o in c.outputs]


def _png_size(b64: str) -> tuple[int, int]:
    data = base64.b64decode(b64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_report_notebook_holds_the_run(history):
    path = flor.report("small@1")
    assert path == Path.cwd() / "flor_reports" / "small@1.ipynb"  # beside the notebook, where Jupyter shows it
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert str(history.home.resolve()) not in path.read_text()  # no absolute store path
    assert "STORE = '../.flor'" in nb.cells[1].source and nb.metadata["flor_nb"]["store"] == "../.flor"
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for heading in ("# Run report: small@1", "## Summary", "## Code", "## Metrics", "## Checkpoints"):
        assert heading in markdown

    # Code: the recorded cell, its dependency, and the replay as a diff with epochs and verdict.
    assert "flor.log(\"acc\", acc)" in markdown and "EPOCHS = 5" in markdown
    assert "-        opt.step()\n+        flor.log('gn', grad_norm(model)); opt.step()" in markdown
    assert "Replay 1: epochs 1-2, probes gn (faithful)" in markdown
    assert "Faithful replay: recorded metrics reproduced exactly" in markdown
    assert "checkpoints taken before the loop and in epochs 0-4" in markdown

    # Tables: the embedded epoch-level table is what the public API gives; final and best values are listed.
    logs = flor.dataframe(run="small@1")
    epoch_level = logs[logs["step"].isna()].dropna(axis="columns", how="all").reset_index(drop=True)
    htmls = [o.data["text/html"] for _, o in _outputs(nb) if "text/html" in o.get("data", {})]
    assert epoch_level._repr_html_() in htmls
    acc = epoch_level["acc"].tolist()
    summary = next(o.data["text/plain"] for i, o in _outputs(nb) if "metric_summary" in nb.cells[i].source)
    assert len(acc) == 5 and f"{acc[-1]:.6f}" in summary and f"{max(acc):.6f}" in summary
    assert "hindsight" in summary and "gn" in summary
    run_table = next(o.data["text/plain"] for i, o in _outputs(nb) if "run_summary" in nb.cells[i].source)
    for field in ("finished", "5 of 5", "arg.lr", "env.torch"):
        assert field in run_table
    ckpt_table = next(o.data["text/plain"] for i, o in _outputs(nb) if "checkpoint_table" in nb.cells[i].source)
    assert "epoch-00004.step.ckpt" in ckpt_table

    # Plots: one PNG per numeric name, recorded (acc, loss) and hindsight (gn).
    plots = {nb.cells[i].source: o.data["image/png"] for i, o in _outputs(nb) if "image/png" in o.get("data", {})}
    assert set(plots) == {f"figure(RUN, {m!r}, store=STORE)" for m in ("acc", "loss", "gn")}
    assert all(_png_size(b64)[0] > 300 for b64 in plots.values())

    # flor.report stays callable after its module is imported.
    again = flor.report("small@1", path=history.home.parent / "again")
    assert again.name == "again.ipynb" and again.exists()


def test_report_reexecutes_to_the_same_tables(history, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    path = flor.report("small@1")
    nb = nbformat.read(path, as_version=4)
    embedded = {i: o.data for i, o in _outputs(nb)}
    # The report and the store moved together to another folder: a fresh kernel, started in the report's
    # folder as Jupyter does, finds the store only through the relative path written in the report.
    monkeypatch.delenv("FLOR_NB_HOME")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(history.home, elsewhere / ".flor")
    shutil.copytree(path.parent, elsewhere / "flor_reports")
    shutil.rmtree(history.home)
    NotebookClient(nb, kernel_name="python3", timeout=120,
                   resources={"metadata": {"path": str(elsewhere / "flor_reports")}}).execute()
    executed = {i: o.data for i, o in _outputs(nb) if o.output_type == "execute_result"}
    assert set(executed) == set(embedded)
    tables = [i for i, data in embedded.items() if "text/html" in data]
    assert len(tables) == 5  # run summary, metric summary, epoch- and step-level values, checkpoints
    for i in tables:
        assert executed[i]["text/html"] == embedded[i]["text/html"], nb.cells[i].source
        assert executed[i]["text/plain"] == embedded[i]["text/plain"], nb.cells[i].source
    for i, data in embedded.items():
        if "image/png" in data:
            assert _png_size(executed[i]["image/png"])[0] > 300
    assert not (elsewhere / "flor_reports" / ".flor").exists()


def test_html_report_shows_plots_and_keeps_logged_strings_inert(history, tmp_path):
    from playwright.sync_api import sync_playwright

    path = flor.report("small", html=True, all_versions=True)
    assert path == Path.cwd() / "flor_reports" / "small.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].source.startswith("# Comparing 2 versions of small")
    page_html = path.with_suffix(".html").read_text()
    assert HOSTILE not in page_html and "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in page_html
    assert "cdnjs" not in page_html

    fetched = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.route("http*://**", lambda route: (fetched.append(route.request.url), route.abort()))
            page.goto(path.with_suffix(".html").as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img[src^='data:image/png']", "els => els.map(e => [e.complete, e.naturalWidth])")
            pwned = page.evaluate("typeof window.__pwned")
            text = page.inner_text("body")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert len(images) == 3 and all(done and width > 300 for done, width in images)  # acc, loss, gn
    assert pwned == "undefined"
    assert HOSTILE in text  # shown as text, not run
    assert "small@1" in text and "small@2" in text and "Checkpoints" in text
    assert fetched == []  # self-contained: nothing fetched from the network
    out = Path(__file__).resolve().parents[1] / "out"
    out.mkdir(exist_ok=True)
    shutil.copy(tmp_path / "report.png", out / "report-screenshot.png")


def test_report_of_a_single_version_name_and_unknown_run(recorded, store, tmp_path):
    path = flor.report("small", path=tmp_path / "r.html")
    assert path == tmp_path / "r.ipynb" and path.with_suffix(".html").exists()
    assert nbformat.read(path, as_version=4).cells[0].source.startswith("# Run report: small@1")
    with pytest.raises(FlorError, match="Known runs: small@1"):
        flor.report("nope")


def test_a_bare_name_reports_the_latest_version(history):
    nb = nbformat.read(flor.report("small"), as_version=4)
    assert nb.cells[0].source.startswith("# Run report: small@2")


def test_cancelled_replay_is_reported_as_partial(recorded, store):
    from flor_nb.executor import ReplayCancelled

    class CancelAtOnce:  # an executor (see flor_nb.executor) whose user pressed Cancel before any segment ended
        def run(self, fn, tasks, on_event=None):
            raise ReplayCancelled("Replay cancelled.", [None] * len(tasks))

        def cancel(self):
            pass

    with pytest.raises(ReplayCancelled) as e:
        flor.replay("small", code=PROBE, epochs="1-2", store=store, executor=CancelAtOnce())
    assert e.value.result.empty and e.value.result.attrs["fidelity"]["level"] == "caveats"
    assert e.value.result.attrs["verdict"].startswith("Replay cancelled before any epoch's results were kept")
    markdown = "\n".join(c.source for c in nbformat.read(flor.report("small@1"), as_version=4).cells)
    assert "Replay 1: epochs 1-2, probes none kept (cancelled: nothing kept)" in markdown
    assert "(faithful)" not in markdown


def test_failed_replay_is_reported_with_its_error_and_no_kept_probes(recorded, store):
    code = TRAIN.replace("opt.step()", "flor.log('ratio', 1 / (epoch - 1)); opt.step()")
    with pytest.raises(FlorError, match="ZeroDivisionError"):
        flor.replay("small", code=code, epochs="1", store=store)
    markdown = "\n".join(c.source for c in nbformat.read(flor.report("small@1"), as_version=4).cells)
    assert "Replay 1: epochs 1, probes none kept (failed)" in markdown  # not "probes none": the diff shows one
    assert "Replay failed: The replayed code raised ZeroDivisionError" in markdown and "no verdict" not in markdown
    assert "+        flor.log('ratio'" in markdown


def test_plots_break_where_epochs_were_not_replayed():
    from flor_nb.reporting import _break_gaps

    xs, ys = _break_gaps([1, 1, 3, 3], [10, 11, 30, 31], [0.1, 0.2, 0.3, 0.4])
    assert xs[:2] == [10, 11] and xs[3:] == [30, 31] and ys[2] != ys[2]  # NaN between epochs 1 and 3


def test_report_lists_what_was_not_captured(store):
    record_with_a_lock(store)
    nb = nbformat.read(flor.report("locked", store=store), as_version=4)
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert r"**Warning.** Not captured in locked@1: guard.lock \(lock: a lock \(threading\) cannot be saved\)" \
        in markdown, markdown  # markdown punctuation escaped
    tables = "".join(o["data"].get("text/html", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                     if "data" in o)
    assert "not captured" in tables and "guard.lock" in tables
