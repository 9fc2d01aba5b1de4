"""Code and probes: the recorded cell as clickable lines, a probe form with presets, the probe list.

The probe logic is the engine's: where code goes (``flor_nb.probes``), what is
wrong with it (``flor_nb.probe_check``), presets (``flor_nb.presets``), memory
(the store); this module only shows it and collects the user's choices.
"""
from __future__ import annotations

import functools

import ipywidgets as W

from flor_nb import presets as PS
from flor_nb import probe_check as C
from flor_nb import probes as P
from flor_nb.errors import FlorError

from .common import NBSP, Callbacks, guarded, layout
from .style import code_block, esc


class ProbeEditor(W.VBox, Callbacks):
    """Probes of one run. ``on_change()`` runs when the probes change; ``on_status(kind, text)`` reports."""

    def __init__(self, store, on_change, on_status, on_fail):
        super().__init__()
        self.store, self.on_change, self.on_status, self._fail = store, on_change, on_status, on_fail
        self.run = None
        self.probes: list[P.Probe] = []
        self.problems: list[C.Problem] = []
        self.objects: dict = {}

        self.deps = W.Accordion(children=[W.HTML()], selected_index=None)
        self.code_lines = W.Select(options=[], rows=12, layout=layout(width="100%"))
        self.code_lines.add_class("flor-mono")
        self.code_lines.add_class("flor-lines")
        self.code_lines.observe(self._on_line, "value")
        kinds = [("Free code", "code")] + [(p.title, k) for k, p in PS.PRESETS.items()]
        self.kind = W.Dropdown(options=kinds, value="code", description="Probe", layout=layout(width="360px"))
        self.kind.add_class("flor-kind")
        self.kind.observe(self._on_kind, "value")
        self.params = {
            "name": W.Text(description="log as", layout=layout(width="260px")),
            "model": W.Combobox(description="model", ensure_option=False, layout=layout(width="260px")),
            "module": W.Combobox(description="module", ensure_option=False, layout=layout(width="260px"),
                                 placeholder="submodule path, e.g. 0 or layer1.conv"),
            "optimizer": W.Combobox(description="optimizer", ensure_option=False, layout=layout(width="260px")),
            "outputs": W.Text(description="outputs", layout=layout(width="360px")),
            "labels": W.Text(description="labels", layout=layout(width="260px")),
        }
        for w in self.params.values():
            w.observe(self._on_param, "value")
        self.where = W.Dropdown(description="runs", options=[("once (top level of the cell)", 0)],
                                layout=layout(width="420px"))
        self.where.add_class("flor-where")
        self.where.observe(self._on_where, "value")
        self.code_box = W.Textarea(placeholder='Code to insert after the selected line, e.g. '
                                               'flor.log("grad_norm", grad_norm(model))',
                                   rows=4, layout=layout(width="100%"))
        self.code_box.add_class("flor-mono")
        self.code_box.add_class("flor-code-box")
        self.code_box.observe(self._on_draft_code, "value")
        self.add_button = W.Button(description="Add probe", icon="plus", button_style="primary",
                                   tooltip="Insert this code after the selected line")
        self.add_button.on_click(self._on_add)
        self.draft_msg = W.HTML()
        self.probe_list = W.VBox()
        self.preview = W.HTML()
        p = self.params
        form = W.VBox([
            W.HBox([self.kind, self.where]),
            W.HBox([p["name"], p["model"], p["module"]], layout=layout(flex_flow="row wrap")),
            W.HBox([p["optimizer"], p["outputs"], p["labels"]], layout=layout(flex_flow="row wrap")),
            self.code_box, W.HBox([self.add_button, self.draft_msg]),
        ])
        self.children = [self.deps, self.code_lines, form,
                         W.HTML('<div class="flor-muted" style="margin-top:6px">Probes (remembered for this run)</div>'),
                         self.probe_list, self.preview]
        self._show_params("code")

    # -- the run -------------------------------------------------------------
    def set_run(self, run):
        """Show ``run``'s cells and the probes remembered for it."""
        self.run = run
        self.probes, carried = P.remembered(run, self.store)
        if carried:
            P.save(run, self.probes, self.store)  # now this version's own
            self.on_status("ok", carried)
        try:
            self.objects = PS.objects(run, self.store)
        except (FlorError, OSError, RuntimeError):  # no readable checkpoint: presets fall back to plain names
            self.objects = {}
        deps = run.deps
        blocks = "".join(f'<div class="flor-muted">In[{c["count"]}] in the kernel that recorded the run</div>'
                         f'{code_block(c["source"].strip(chr(10)))}' for c in deps) or '<span class="flor-muted">none</span>'
        self.deps.children = [W.HTML(blocks)]
        names = ", ".join(f"In[{c['count']}]" for c in deps)
        self.deps.set_title(0, f"Setup cells replay re-runs: {len(deps)} ({names} of the recording kernel)" if deps
                            else "Setup cells replay re-runs: none")
        self.deps.selected_index = None
        models = [n for n, o in self.objects.items() if o["kind"] == "module"] or ["model"]
        with self.quiet():
            self.params["model"].options = models
            self.params["optimizer"].options = [n for n, o in self.objects.items() if o["kind"] == "optimizer"] or [
                "optimizer"]
            self.params["module"].options = self.objects.get(models[0], {}).get("modules", [""])
            self._reset_form()
        first = next((i for i, s in enumerate(run.code.splitlines(), start=1) if s.strip()), 0)
        self.refresh(line=first)

    def _reset_form(self):
        with self.quiet():
            self.kind.value = "code"
            self.code_box.value = ""
            self.draft_msg.value = ""
        self._show_params("code")

    # -- showing the probes --------------------------------------------------
    def refresh(self, line=None):
        """Re-check the probes and redraw the cell lines, the probe list and the edited cell."""
        run = self.run
        self.problems = C.check(run, self.probes) if self.probes else []
        bad = {pr.probe: pr for pr in self.problems if pr.probe >= 0}
        anchors: dict = {}
        for i, p in enumerate(self.probes):
            anchors.setdefault(P.insertion_point(run.code, p.line)[0], []).append(i)
        lines = run.code.splitlines()
        options = []
        for n, text in enumerate([""] + lines):
            label = f"{n:>3}{NBSP * 2}" + (text.replace(" ", NBSP) if n else "(before the first line)")
            for i in anchors.get(n, []):
                title = self.probes[i].title
                label += NBSP * 3 + (f"\u2716 {title}: {bad[i].message}" if i in bad else f"\u25c0 probe: {title}")
            options.append((label, n))
        keep = self.code_lines.value if line is None else line
        with self.quiet():
            self.code_lines.options = options
            self.code_lines.rows = min(len(options), 16)
            self.code_lines.value = keep if keep is not None and keep <= len(lines) else 0
        self._update_levels()
        self._render_list(bad)
        self._render_preview(bad)
        self.on_change()

    def _render_list(self, bad):
        rows = []
        for i, p in enumerate(self.probes):
            where = P.insertion_point(self.run.code, p.line)[0]
            lines = p.code.strip().splitlines()
            more = " \u2026" if len(lines) > 1 else ""
            msg = f'<div class="flor-problem">\u2716 {esc(bad[i].message)}</div>' if i in bad else ""
            text = (f'<div class="flor-probe {"bad" if i in bad else ""}"><b>after line {where}</b> \u00b7 '
                    f'{esc(p.title)} \u00b7 <span class="flor-muted">{esc(lines[0][:80])}{more}</span>{msg}</div>')
            remove = W.Button(description="Remove", icon="trash", layout=layout(width="96px"))
            edit = W.Button(description="Edit", icon="pencil", layout=layout(width="80px"))
            remove.on_click(functools.partial(self._on_remove, i))
            edit.on_click(functools.partial(self._on_edit, i))
            rows.append(W.HBox([remove, edit, W.HTML(text)], layout=layout(align_items="center")))
        self.probe_list.children = rows or [W.HTML(
            '<span class="flor-muted">No probes yet. A replay without probes re-checks the recorded metrics.</span>')]

    def _render_preview(self, bad):
        if not self.probes:
            self.preview.value = ""
            return
        edited, spans = P.apply(self.run.code, self.probes)
        added = {n for s in spans if s for n in range(s[0], s[1] + 1)}
        errors = {spans[i][0]: bad[i].message for i in bad if spans[i]}
        whole = "".join(f'<div class="flor-problem">\u2716 {esc(pr.message)}</div>'
                        for pr in self.problems if pr.probe < 0)
        self.preview.value = ('<details open><summary class="flor-muted">The cell as it will be replayed (probes in '
                              f"green)</summary>{code_block(edited, added=added, errors=errors)}</details>{whole}")

    def _update_levels(self):
        indent, levels = P.levels(self.run, self.code_lines.value or 0)
        with self.quiet():
            self.where.options = levels
            self.where.value = indent if indent in [i for _, i in levels] else levels[0][1]
        # one choice is no choice: show the control only where the probe could run at several levels
        self.where.layout.display = None if len(levels) > 1 else "none"

    def _show_params(self, key):
        used = set(PS.PRESETS[key].params) if key in PS.PRESETS else set()
        for name, w in self.params.items():
            w.layout.display = None if name in used else "none"

    # -- the form ------------------------------------------------------------
    @guarded
    def _on_line(self, change):
        """Choose a line."""
        self._update_levels()
        self._check_draft()

    @guarded
    def _on_where(self, change):
        """Choose the level."""
        self._check_draft()

    @guarded
    def _on_kind(self, change):
        """Choose a probe preset."""
        key = change["new"]
        self._show_params(key)
        self.draft_msg.value = ""
        if key not in PS.PRESETS:
            return
        defaults = PS.preset_defaults(self.run, key, self.objects)
        probe = PS.preset(self.run, key, defaults, objs=self.objects)
        with self.quiet():
            for name, value in defaults.items():
                self.params[name].value = value
            self.code_lines.value = P.insertion_point(self.run.code, probe.line)[0]
        self._update_levels()
        if probe.indent is not None:
            self.where.value = probe.indent
        self.code_box.value = probe.code
        if PS.PRESETS[key].note:
            self.draft_msg.value = f'<span class="flor-muted">{esc(PS.PRESETS[key].note)}</span>'

    @guarded
    def _on_param(self, change):
        """Fill in the preset."""
        key = self.kind.value
        if key not in PS.PRESETS:
            return
        if change["owner"] is self.params["model"] and self.objects.get(change["new"], {}).get("modules"):
            self.params["module"].options = self.objects[change["new"]]["modules"]
        values = {n: self.params[n].value for n in PS.PRESETS[key].params}
        self.code_box.value = PS.preset(self.run, key, values, line=0, objs=self.objects).code

    @guarded
    def _on_draft_code(self, change):
        """Check the probe code."""
        self._check_draft()

    def draft(self) -> P.Probe:
        """The probe the form describes."""
        key = self.kind.value
        params = {n: self.params[n].value for n in PS.PRESETS[key].params} if key in PS.PRESETS else {}
        return P.Probe(line=self.code_lines.value or 0, code=self.code_box.value, preset=key, params=params,
                       indent=self.where.value)

    def _check_draft(self):
        if self.run is None or not self.code_box.value.strip():
            return
        mine = [pr for pr in C.check(self.run, self.probes + [self.draft()]) if pr.probe == len(self.probes)]
        if mine:
            self.draft_msg.value = "".join(f'<div class="flor-problem">\u2716 {esc(pr.message)}</div>' for pr in mine)
        elif not self.draft_msg.value or "flor-problem" in self.draft_msg.value:
            self.draft_msg.value = '<span class="flor-status ok">\u2714 parses; names are defined</span>'

    @guarded
    def _on_add(self, _button=None):
        """Add the probe."""
        if self.run is None:
            raise FlorError("Select a run first.")
        if not self.code_box.value.strip():
            raise FlorError('Write the probe\'s code first, e.g. flor.log("grad_norm", grad_norm(model)).')
        probe = self.draft()
        self._reset_form()  # first, so a front end sees the form cleared before the probe shows up
        self.add(probe)

    def add(self, probe: P.Probe):
        """Add ``probe`` to the run's probes (saved at once); its problems show at its line."""
        self.probes.append(probe)
        self._save_and_refresh()
        if self.problems:
            self.on_status("bad", f"{len(self.problems)} probe problem(s): see the marked lines")
        else:
            self.on_status("ok", f"{len(self.probes)} probe(s) ready")

    def _save_and_refresh(self, line=None):
        P.save(self.run, self.probes, self.store)
        self.refresh(line)

    @guarded
    def _on_remove(self, index, _button=None):
        """Remove the probe."""
        del self.probes[index]
        self._save_and_refresh()
        self.on_status("ok", f"{len(self.probes)} probe(s)")

    @guarded
    def _on_edit(self, index, _button=None):
        """Edit the probe."""
        probe = self.probes.pop(index)
        self._save_and_refresh(line=probe.line)
        with self.quiet():
            self.kind.value = probe.preset if probe.preset in PS.PRESETS else "code"
            for name, value in probe.params.items():
                if name in self.params:
                    self.params[name].value = value
        self._show_params(self.kind.value)
        if probe.indent in [v for _, v in self.where.options]:
            self.where.value = probe.indent
        self.code_box.value = probe.code
