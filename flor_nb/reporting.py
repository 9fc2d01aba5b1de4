"""Export a run as a standalone notebook report (and optionally HTML).

The report is an ordinary ``.ipynb``: its tables and figures are embedded
outputs, so it reads without a kernel, and its code cells load everything from
the store, so running it again on a fresh kernel reproduces them. The builder
runs each code cell's source in-process to make its embedded outputs, so what
is embedded is exactly what re-execution gives.
"""
from __future__ import annotations

import ast
import base64
import difflib
import html
import io
import os
import re
from collections import Counter
from datetime import datetime
from pathlib import Path

import nbformat
import pandas as pd
from jinja2 import DictLoader
from matplotlib.figure import Figure  # no pyplot, so no global backend is touched
from matplotlib.ticker import MaxNLocator
from nbconvert import HTMLExporter
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from .api import cells_label, checkpoints, get_store, not_captured
from .edits import probe_diff
from .plan import format_epochs
from .store import Run, Store
from .validate import arg_live
from .verdict import verdict_text

REPORTS = "flor_reports"  # default folder, beside the notebook (the working directory): Jupyter's file browser shows it

# Metrics whose names look like these are better when lower.
_LOWER_IS_BETTER = re.compile(r"loss|err|mse|mae|nll|perplex|ppl|cost|wer|cer|dist", re.IGNORECASE)
# pandas display options of a fresh Jupyter kernel (pandas picks max_columns=0 in a terminal),
# so embedded tables are what re-running the report prints, whoever builds it.
_KERNEL_PANDAS = ("display.max_columns", 20, "display.width", 80, "display.max_rows", 60, "display.min_rows", 10)
# Markdown punctuation that could start emphasis, links, tables, math or HTML.
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#|~$!<>])")


# -- what the report's code cells call -------------------------------------------
def runs_of(run, store=None) -> list[Run]:
    """``NAME@VERSION`` is that run, a bare ``NAME`` its latest version, ``NAME@all`` every version (oldest first)."""
    st = get_store(store)
    name, _, version = str(run.label if isinstance(run, Run) else run).partition("@")
    if version != "all":
        return [st.find_run(run)]
    st.find_run(name)  # raises with the known runs if the name is unknown
    return sorted((r for r in st.all_runs() if r.name == name), key=lambda r: r.version)


def run_summary(run, store=None) -> pd.DataFrame:
    """One column per run version: status, timing, epochs, checkpoints, environment, hyperparameters."""
    st = get_store(store)
    columns = {}
    for r in runs_of(run, st):
        ckpts = st.checkpoints(r.id)
        col = {
            "name": r.name, "version": str(r.version), "status": r.status,
            "started": str(datetime.fromtimestamp(r.started).replace(microsecond=0)),
            "duration": "" if r.duration is None else f"{r.duration:.2f} s",
            "epochs": f"{r.epochs_completed}" + (f" of {r.epochs_total}" if r.epochs_total else ""),
            "checkpoints": f"{len(ckpts)} ({sum(c['bytes'] for c in ckpts.values()) / 1e6:.2f} MB)",
            "cells": cells_label(r),
            "not captured": ", ".join(sorted(r.state.get("not_captured") or {})) or "nothing",
        }
        if r.error:
            col["error"] = r.error
        col.update({f"arg.{k}": str(arg_live(v)) for k, v in sorted(r.args.items())})
        col.update({f"env.{k}": str(v) for k, v in r.env.items()})
        columns[r.label] = col
    return pd.DataFrame(columns).fillna("")


def metric_summary(run, store=None) -> pd.DataFrame:
    """One row per (run, logged name): where it came from, its level, final and best value."""
    st = get_store(store)
    rows = []
    for r in runs_of(run, st):
        by_name: dict = {}
        for row in st.logs([r.id]):
            by_name.setdefault(row["name"], []).append(row)
        for name in sorted(by_name, key=lambda n: (by_name[n][0]["kind"] != "recorded", n)):
            logs = by_name[name]
            values = [(row["epoch"], row["step"], st.decode(row["value"])) for row in logs]
            numeric = [(e, s, _number(v)) for e, s, v in values if _number(v) is not None]
            steps = {s is None for _, s, _ in values}
            level = "mixed" if len(steps) > 1 else ("epoch" if steps == {True} else "step")
            goal = "min" if _LOWER_IS_BETTER.search(name) else "max"
            final = values[-1][2]
            best = best_at = None
            if numeric and len(numeric) == len(values):
                e, s, best = (min if goal == "min" else max)(numeric, key=lambda t: t[2])
                final = float(final)
                best_at = f"epoch {e}" + ("" if s is None else f" step {s}")
            rows.append({
                "run": r.label, "metric": name, "source": logs[0]["kind"], "level": level,
                "epochs": _format_epochs(sorted({e for e, _, _ in values if e is not None})),
                "values": len(values), "final": final if isinstance(final, (int, float)) else _short(final),
                "best": best, "goal": goal if best is not None else "", "best_at": best_at or "",
            })
    return pd.DataFrame(rows, columns=["run", "metric", "source", "level", "epochs", "values",
                                       "final", "best", "goal", "best_at"])


def checkpoint_table(run, store=None) -> pd.DataFrame:
    """``flor.checkpoints`` of each version, with a readable size (epoch -1: before the loop)."""
    frames = []
    for r in runs_of(run, store):
        frame = checkpoints(r.label, store=store)
        frame.insert(0, "run", r.label)
        frame.insert(3, "size_kB", (frame["bytes"] / 1024).round(1))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


class Plot:
    """A rendered figure: shows as a PNG in notebooks (``_repr_png_``)."""

    def __init__(self, png: bytes, title: str):
        self.png, self.title = png, title

    def _repr_png_(self) -> bytes:
        return self.png

    def __repr__(self):
        return f"<Plot: {self.title}>"


def figure(run, metric, store=None) -> Plot:
    """Plot ``metric`` of ``run`` (every version overlaid): by epoch, or by global step for step-level values.

    Lines break where epochs are missing (a replay of epochs 1-2 and 5 draws nothing over 3-4).
    """
    st = get_store(store)
    fig = Figure(figsize=(7.5, 3.4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    kinds, levels, bounds, span = set(), set(), {}, 0
    for r in runs_of(run, st):
        rows = [row for row in st.logs([r.id], names=[metric]) if _number(st.decode(row["value"])) is not None]
        if not rows:
            continue
        kinds.add(rows[0]["kind"])
        step_level = any(row["step"] is not None for row in rows)
        levels.add("step" if step_level else "epoch")
        label = r.label
        if rows[0]["kind"] == "hindsight":
            label += f" (hindsight, epochs {_format_epochs(sorted({row['epoch'] for row in rows}))})"
        # values repeated at one (epoch, step) sit side by side within it, none hidden behind another
        repeats = Counter((row["epoch"], row["step"]) for row in rows)
        frac = [row["seq"] / repeats[(row["epoch"], row["step"])] for row in rows]
        if step_level:
            offsets, total = _step_offsets(st, r)
            bounds, span = (offsets, total) if total > span else (bounds, span)
            xs = [offsets.get(row["epoch"], 0) + (row["step"] or 0) + f for row, f in zip(rows, frac)]
        else:
            xs = [None if row["epoch"] is None else row["epoch"] + f for row, f in zip(rows, frac)]
        ys = [_number(st.decode(row["value"])) for row in rows]
        xs, ys = _break_gaps([row["epoch"] for row in rows], xs, ys)
        ax.plot(xs, ys, marker="o" if not step_level else None, markersize=4, linewidth=1.4,
                linestyle="--" if rows[0]["kind"] == "hindsight" else "-", label=_mpl(label))
    level = "step" if "step" in levels else "epoch"
    if level == "step":
        ax.set_xlabel("global step (dotted lines: epoch boundaries)")
        ax.set_xlim(-0.5, span - 0.5)
        for epoch, x in sorted(bounds.items()):
            ax.axvline(x, color="0.8", linestyle=":", linewidth=0.8)
            if len(bounds) <= 20:
                ax.text(x, 1.0, f" epoch {epoch}", transform=ax.get_xaxis_transform(), fontsize=7,
                        color="0.45", va="bottom")
    else:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    source = "hindsight probe" if kinds == {"hindsight"} else "recorded"
    title = f"{metric}: {level}-level, {source}, {_label(run, st)}"
    ax.set_ylabel(_mpl(metric))
    ax.set_title(_mpl(title), fontsize=11, pad=14 if level == "step" else 6)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return Plot(buf.getvalue(), title)


def _break_gaps(epochs, xs, ys):
    """Insert a break (NaN) between values of epochs that are not consecutive, so no line spans a gap."""
    out_x, out_y, prev = [], [], None
    for e, x, y in zip(epochs, xs, ys):
        if prev is not None and e is not None and e > prev + 1:
            out_x.append(float("nan"))
            out_y.append(float("nan"))
        out_x.append(x)
        out_y.append(y)
        prev = e if e is not None else prev
    return out_x, out_y


# -- building the notebook ------------------------------------------------------------
def report(run, path=None, html=False, store=None, all_versions=False) -> Path:
    """Write a notebook report of ``run`` and return its path.

    Parameters
    ----------
    run : ``NAME@VERSION``, or ``NAME`` for its latest version.
    path : where to write the ``.ipynb`` (a folder, or a file); default
        ``flor_reports/<NAME>@<VERSION>.ipynb`` in the working directory (beside the notebook, so
        Jupyter's file browser shows it); ``<NAME>.ipynb`` when comparing versions.
    html : also write a self-contained ``.html`` next to it (same name).
    store : a Store or store path; default ``$FLOR_NB_HOME`` or ``./.flor``.
    all_versions : compare every version of the run's name (as ``NAME@all`` does).
    """
    st = get_store(store)
    if all_versions:
        run = f"{str(run.label if isinstance(run, Run) else run).partition('@')[0]}@all"
    runs = runs_of(run, st)
    spec = runs[0].label if not str(run).endswith("@all") else f"{runs[0].name}@all"
    out = _target(spec, path)
    builder = _Builder(st, spec, runs, _store_ref(st, out.parent))
    nb = new_notebook(cells=builder.build(), metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "flor_nb": {"run": spec, "store": builder.store_ref},
    })
    nbformat.validate(nb)
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(out))
    if html or (path is not None and str(path).endswith(".html")):
        out.with_suffix(".html").write_text(to_html(nb), encoding="utf-8")
    return out.resolve()


def _store_ref(st: Store, folder: Path) -> str:
    """The store's path as the report's code cells should name it: relative to the report's folder
    (the working directory of a kernel that runs the report), so the two can move together."""
    try:
        return Path(os.path.relpath(st.home.resolve(), Path(folder).resolve())).as_posix()
    except ValueError:  # another drive (Windows): only an absolute path reaches it
        return str(st.home.resolve())


def to_html(nb) -> str:
    """One self-contained HTML page: images inline, no scripts fetched from the network."""
    # The lab template loads require.js, MathJax and mermaid from a CDN; the report needs none of them.
    offline = ("{%- extends 'index.html.j2' -%}\n{% block html_head_js %}{% endblock %}\n"
               "{% block html_head_js_mathjax %}{% endblock %}\n{% block html_head_js_mermaidjs %}{% endblock %}\n"
               # Plots get alternative text (the stock template has none, and nbconvert warns about it).
               "{% block data_png scoped %}<div class=\"jp-RenderedImage jp-OutputArea-output {{ extra_class }}\">"
               "<img src=\"data:image/png;base64,{{ output.data['image/png'] | escape_html }}\" "
               "alt=\"{{ output.metadata.get('alt', 'flor_nb plot') | escape_html }}\"></div>{% endblock data_png %}\n")
    exporter = HTMLExporter(extra_loaders=[DictLoader({"flor_report.html.j2": offline})],
                            template_file="flor_report.html.j2")
    body, _ = exporter.from_notebook_node(nb)
    return body


class _Builder:
    """Cells of one report, with code cells run in-process so their outputs can be embedded."""

    def __init__(self, store: Store, spec: str, runs: list[Run], store_ref: str):
        self.store, self.spec, self.runs, self.store_ref = store, spec, runs, store_ref
        self.cells: list = []
        self.count = 0
        self.ns: dict = {"__name__": "__flor_report__"}

    def md(self, *lines):
        self.cells.append(new_markdown_cell("\n".join(lines)))

    def code(self, source, hidden=False, run_source=None):
        """A code cell; ``run_source`` is what runs here to make its outputs, when it must differ."""
        self.count += 1
        outputs = _execute(run_source or source, self.ns, self.count)
        meta = {"jupyter": {"source_hidden": True}} if hidden else {}
        self.cells.append(new_code_cell(source, execution_count=self.count, outputs=outputs, metadata=meta))

    def build(self) -> list:
        st, runs = self.store, self.runs
        compare = len(runs) > 1
        head = f"Comparing {len(runs)} versions of {runs[0].name}" if compare else f"Run report: {runs[0].label}"
        self.md(f"# {_md(head)}",
                f"Generated {datetime.now().replace(microsecond=0)} by flor\\_nb from the store "
                f"{_md(self.store_ref)} (relative to this report). "
                "Outputs are embedded; run all cells to rebuild them from the store.",
                "", "Sections: Summary, Code, Metrics, Checkpoints.")
        setup = ("import flor_nb as flor\n"
                 "from flor_nb.reporting import checkpoint_table, figure, metric_summary, run_summary\n\n"
                 "STORE = @STORE@  # the run store this report reads, relative to this report's folder\n"
                 f"RUN = {self.spec!r}\n"
                 "logs = flor.dataframe(run=RUN, store=STORE)")
        # built here, not from the report's folder: the in-process run reads the store by its full path
        self.code(setup.replace("@STORE@", repr(self.store_ref)), hidden=True,
                  run_source=setup.replace("@STORE@", repr(str(st.home.resolve()))))
        self.summary()
        self.code_section()
        self.metrics()
        self.checkpoints()
        return self.cells

    def summary(self):
        self.md("## Summary")
        for r in self.runs:
            dur = "" if r.duration is None else f" in {r.duration:.1f} s"
            self.md(f"**{_md(r.label)}** {_md(r.status)}: {r.epochs_completed} epochs{dur}, "
                    f"{len(self.store.checkpoints(r.id))} checkpoints, {len(self.store.replays(r.id))} replays"
                    + (f". Error: {_md(r.error)}" if r.error else "."))
            missing = not_captured(r, self.store)
            if missing:
                self.md(f"**Warning.** {_md(missing)}")
        self.code("run_summary(RUN, store=STORE)")
        self.md("### Final and best values",
                "Every logged name: recorded during training or added later by a hindsight replay. "
                "*best* is the minimum for loss-like names and the maximum otherwise.")
        self.code("metric_summary(RUN, store=STORE)")

    def code_section(self):
        self.md("## Code")
        first = self.runs[0]
        for i, r in enumerate(self.runs):
            if len(self.runs) > 1:
                self.md(f"### {_md(r.label)}")
            if i == 0:
                for cell in r.deps:
                    self.md(f"**Dependency cell In\\[{cell['count']}\\]** (replays rebuild the namespace from it)",
                            "", _fence(cell["source"], "python"))
                self.md("**Training cell** (as recorded)", "", _fence(r.code, "python"))
            else:
                deps_a = "\n".join(c["source"] for c in first.deps)
                deps_b = "\n".join(c["source"] for c in r.deps)
                for what, a, b in (("Dependency cells", deps_a, deps_b), ("Training cell", first.code, r.code)):
                    diff = _diff(a, b, first.label, r.label)
                    self.md(f"**{what}**: " + ("changed since " + _md(first.label) + ":" if diff
                                               else "same as " + _md(first.label) + "."),
                            *(["", _fence(diff, "diff")] if diff else []))
            self.replays(r)

    def replays(self, r: Run):
        reps = self.store.replays(r.id)
        if not reps:
            self.md(f"No hindsight replays of {_md(r.label)} yet.")
            return
        self.md(f"### Hindsight replays of {_md(r.label)}")
        deps = {c["count"]: c["source"] for c in r.deps}
        for n, rep in enumerate(reps, start=1):
            fid = rep.get("fidelity") or {}
            if fid.get("metrics") is not None:
                verdict = verdict_text(fid)
            elif fid.get("error"):  # its first paragraph: what was raised, and where
                verdict = f"Replay {rep['status']}: {str(fid['error']).strip().split(chr(10) * 2)[0][:400]}"
            else:
                verdict = f"Replay {rep['status']}: no verdict."
            dur = "" if rep.get("duration") is None else f" in {rep['duration']:.1f} s"
            # a failed or cancelled replay stored no values: its probes are in the diff below, not "none"
            probes = ", ".join(rep["probes"]) or ("none kept" if rep["status"] in ("cancelled", "failed") else "none")
            lines = [f"#### Replay {n}: epochs {_format_epochs(rep['epochs'])}, probes "
                     f"{_md(probes)} ({_md(_outcome(rep))})",
                     f"{_md(rep['status'].capitalize())}{dur}. {_md(verdict)}", ""]
            diff = probe_diff(r.code, rep["code"])
            lines += ["Edited training cell against the recording:", "", _fence(diff, "diff")] if diff else \
                ["The training cell was replayed unchanged."]
            for count, source in sorted((int(k), v) for k, v in (rep.get("cells") or {}).items()):
                lines += ["", f"Edited dependency cell In\\[{count}\\]:", "",
                          _fence(probe_diff(deps.get(count, ""), source), "diff")]
            self.md(*lines)

    def metrics(self):
        self.md("## Metrics",
                "All logged values, recorded and hindsight, from `flor.dataframe`. "
                "Epoch-level values have an empty step.")
        logs = self.ns["logs"]
        for level, cond in (("Epoch", "isna"), ("Step", "notna")):
            if not getattr(logs["step"], cond)().any():
                continue
            self.md(f"### {level}-level values")
            self.code(f'logs[logs["step"].{cond}()].dropna(axis="columns", how="all").reset_index(drop=True)')
        table = metric_summary(self.spec, self.store)
        plotted = table[table["best"].notna()].drop_duplicates("metric")
        if plotted.empty:
            return
        self.md("### Plots", "Recorded metrics first, then hindsight probes (dashed lines).")
        for name in plotted.sort_values("source", key=lambda s: s != "recorded", kind="stable")["metric"]:
            self.code(f"figure(RUN, {name!r}, store=STORE)")

    def checkpoints(self):
        self.md("## Checkpoints",
                "A checkpoint taken in epoch *k* holds the training state at the exit of its step loop "
                "(or at its end). A replay of epoch *k* starts from the nearest checkpoint taken before it, "
                "and skips the step loop of epochs whose probes all sit outside it.")
        for r in self.runs:
            have = sorted(self.store.checkpoints(r.id))
            where = (["before the loop"] if -1 in have else []) + (
                [f"in epochs {_format_epochs([e for e in have if e >= 0])}"] if any(e >= 0 for e in have) else [])
            self.md(f"{_md(r.label)}: checkpoints taken {' and '.join(where) or 'never'}.")
        self.code("checkpoint_table(RUN, store=STORE)")


def _outcome(rep: dict) -> str:
    """A replay's outcome in a few words: faithful, with caveats, NOT faithful, cancelled (partial), failed."""
    fid = rep.get("fidelity") or {}
    if rep["status"] == "cancelled":
        kept = (fid.get("cancelled") or {}).get("kept") or []
        return f"cancelled: partial, epochs {_format_epochs(kept)} kept" if kept else "cancelled: nothing kept"
    if rep["status"] != "finished" or not fid:
        return rep["status"]
    level = fid.get("level", "faithful" if fid.get("faithful") else "not faithful")
    return {"faithful": "faithful", "caveats": "faithful, with caveats"}.get(level, "NOT faithful")


def _execute(source: str, ns: dict, count: int) -> list:
    """Run a cell's source like a kernel would; the value of a final expression becomes its output."""
    tree = ast.parse(source)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, "<flor report>", "exec"), ns)
    if last is None:
        return []
    value = eval(compile(ast.Expression(last.value), "<flor report>", "eval"), ns)
    if value is None:
        return []
    with pd.option_context(*_KERNEL_PANDAS):
        data = {"text/plain": repr(value)}
        if hasattr(value, "_repr_html_") and (text := value._repr_html_()) is not None:
            data["text/html"] = text
    if hasattr(value, "_repr_png_"):
        data["image/png"] = base64.b64encode(value._repr_png_()).decode("ascii")
    return [new_output("execute_result", data=data, execution_count=count)]


def _target(spec: str, path) -> Path:
    safe = re.sub(r"[^\w@.\-]", "_", spec.removesuffix("@all"))
    if path is None:
        return Path(REPORTS) / f"{safe}.ipynb"
    out = Path(path)
    if out.is_dir():
        return out / f"{safe}.ipynb"
    return out if out.suffix == ".ipynb" else out.with_suffix(".ipynb")


def _label(run, st) -> str:
    runs = runs_of(run, st)
    return runs[0].label if len(runs) == 1 else f"{runs[0].name} (versions {_format_epochs([r.version for r in runs])})"


def _step_offsets(st: Store, r: Run) -> tuple[dict, int]:
    """Global step at which each epoch starts (from the steps logged in each epoch), and the total."""
    per_epoch: dict = {}
    for row in st.logs([r.id]):
        if row["epoch"] is not None and row["step"] is not None:
            per_epoch[row["epoch"]] = max(per_epoch.get(row["epoch"], 0), row["step"] + 1)
    offsets, total = {}, 0
    for epoch in range(max(per_epoch, default=-1) + 1):
        offsets[epoch] = total
        total += per_epoch.get(epoch, 0)
    return offsets, total


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _short(value, limit=80) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _md(text) -> str:
    """User text made inert in markdown: HTML escaped, markdown punctuation backslashed."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(str(text), quote=False)).replace("\n", " ")


def _fence(text: str, lang: str) -> str:
    """A fenced code block that ``text`` cannot close early (its content is escaped by the renderer)."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text.strip(chr(10))}\n{fence}"


def _diff(a: str, b: str, name_a: str, name_b: str) -> str:
    return "".join(difflib.unified_diff(a.splitlines(keepends=True), b.splitlines(keepends=True),
                                        fromfile=name_a, tofile=name_b))


def _mpl(text: str) -> str:
    """Matplotlib reads $...$ as math; show user text literally."""
    return str(text).replace("$", r"\$")


def _format_epochs(values) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    return format_epochs(values)
