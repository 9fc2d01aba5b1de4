"""Probe presets: gradient norm, learning rate, histograms, ... as plain PyTorch code.

A preset is a template; :func:`preset` fills it in from the run (its model,
optimizer, batch names, read from the first checkpoint) and places it where it
belongs (after ``loss.backward()``, at the end of the epoch, ...).
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from . import checkpoint
from .errors import FlorError
from .instrument import instrument, parse, recorded_loops
from .probes import Probe, header_end, hint, indent_of, is_block, loop_at, statements
from .store import get_store


@dataclass(frozen=True)
class Preset:
    key: str
    title: str
    template: str
    where: str  # "backward", "step_start", "epoch_end" or "before_loop": where it goes by default
    params: tuple = ()  # parameter names the template uses
    note: str = ""


PRESETS = {p.key: p for p in [
    Preset("grad_norm", "Gradient norm",
           'flor.log("{name}", sum(p.grad.detach().norm() ** 2 for p in {model}.parameters()\n'
           '                      if p.grad is not None) ** 0.5)',
           "backward", ("name", "model"), "after loss.backward(), inside the step loop"),
    Preset("weight_norm", "Weight norm",
           'flor.log("{name}", sum(p.detach().norm() ** 2 for p in {model}.parameters()) ** 0.5)',
           "epoch_end", ("name", "model")),
    Preset("weight_hist", "Weight histogram per layer",
           'flor.log("{name}", {{n: {{"min": p.detach().min().item(), "max": p.detach().max().item(),\n'
           '                     "counts": p.detach().float().histc(bins=20).tolist()}}\n'
           '                 for n, p in {model}.named_parameters()}})',
           "epoch_end", ("name", "model")),
    Preset("grad_hist", "Gradient histogram per layer",
           'flor.log("{name}", {{n: {{"min": p.grad.min().item(), "max": p.grad.max().item(),\n'
           '                     "counts": p.grad.float().histc(bins=20).tolist()}}\n'
           '                 for n, p in {model}.named_parameters() if p.grad is not None}})',
           "backward", ("name", "model"), "after loss.backward(); logs every step"),
    Preset("lr", "Learning rate",
           'flor.log("{name}", {optimizer}.param_groups[0]["lr"])',
           "epoch_end", ("name", "optimizer")),
    Preset("activation", "Activation mean/std (forward hook)",
           'if not hasattr({model}.get_submodule("{module}"), "_flor_hook_{slug}"):  # once, at the first step\n'
           '    def _flor_hook_{slug}(mod, inputs, output):\n'
           '        flor.log("{name}.mean", output.detach().float().mean())\n'
           '        flor.log("{name}.std", output.detach().float().std())\n'
           '    {model}.get_submodule("{module}")._flor_hook_{slug} = (\n'
           '        {model}.get_submodule("{module}").register_forward_hook(_flor_hook_{slug}))',
           "step_start", ("name", "model", "module"),
           "registers a forward hook at the first replayed step; logs every forward call of the module"),
    Preset("class_acc", "Per-class accuracy",
           'flor.log("{name}", {{int(c): float((pred[{labels} == c] == c).float().mean())\n'
           '                 for pred in [({outputs}).detach().argmax(1)] for c in {labels}.unique()}})',
           "epoch_end", ("name", "outputs", "labels"),
           "runs one extra forward pass: place it where the model is in eval mode, or use existing outputs"),
]}

DEFAULT_NAMES = {"grad_norm": "grad_norm", "weight_norm": "weight_norm", "weight_hist": "weight_hist",
                 "grad_hist": "grad_hist", "lr": "lr", "activation": "act", "class_acc": "class_acc"}


def objects(run, store=None) -> dict[str, dict]:
    """Stateful objects of ``run`` from its first checkpoint: ``{name: {"kind", "modules"}}``.

    ``kind`` is ``module``, ``optimizer`` or ``other``; ``modules`` lists a
    module's submodules that hold parameters or buffers (``""`` is the module itself).
    """
    st = get_store(store)
    ckpts = st.checkpoints(run.id)
    if not ckpts:
        return {}
    snap = checkpoint.read(st.home, ckpts[min(ckpts)]["path"])  # the first: state before the epoch loop
    out = {}
    for key, value in snap["tensors"].items():
        kind, _, path = key.partition("/")
        if kind != "obj" or not isinstance(value, dict):
            continue
        if f"train/{path}" in snap["python"]:
            mods = sorted({k.rpartition(".")[0] for k in value},
                          key=lambda m: [(0, int(x), "") if x.isdigit() else (1, 0, x) for x in m.split(".")])
            out[path] = {"kind": "module", "modules": [""] + [m for m in mods if m]}
        elif "param_groups" in value:
            out[path] = {"kind": "optimizer", "modules": []}
        else:
            out[path] = {"kind": "other", "modules": []}
    return out


def preset_defaults(run, key: str, objs: dict | None = None) -> dict:
    """Parameters for preset ``key`` guessed from the run: its model, optimizer, batch names."""
    objs = objs or {}
    model = next((n for n, o in objs.items() if o["kind"] == "module"), "model")
    optimizer = next((n for n, o in objs.items() if o["kind"] == "optimizer"), "optimizer")
    modules = objs.get(model, {}).get("modules") or [""]
    module = modules[1] if len(modules) > 1 else ""
    inputs, labels = _eval_names(run.code, model, hint(run)) or _batch_names(run.code, hint(run))
    params = {"name": DEFAULT_NAMES.get(key, key), "model": model, "optimizer": optimizer, "module": module,
              "outputs": f"{model}({inputs})", "labels": labels}
    if key == "activation":
        params["name"] = f"act.{module}" if module else "act"
    return {k: params[k] for k in PRESETS[key].params}


def _eval_names(code: str, model: str, hint=None) -> tuple[str, str] | None:
    """Names of an epoch-level evaluation outside the step loop: ``(model(X).argmax(1) == y)`` -> ("X", "y")."""
    try:
        _, loops = instrument(code, hint=hint)
    except FlorError:
        return None
    tree = parse(code)
    epoch = loop_at(tree, loops.epoch_line)
    step = loop_at(tree, loops.step_line) if loops.step_line else None
    inputs = labels = None
    for node in ast.walk(epoch):
        if step is not None and step.lineno <= getattr(node, "lineno", 0) <= step.end_lineno:
            continue
        if (inputs is None and isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == model and len(node.args) == 1 and isinstance(node.args[0], ast.Name)):
            inputs = node.args[0].id
        if (labels is None and isinstance(node, ast.Compare) and len(node.comparators) == 1
                and isinstance(node.comparators[0], ast.Name) and "argmax" in ast.unparse(node.left)):
            labels = node.comparators[0].id
    return (inputs, labels) if inputs and labels else None


def _batch_names(code: str, hint=None) -> tuple[str, str]:
    """The step loop's (inputs, labels) names, e.g. ``for xb, yb in loader`` -> ("xb", "yb")."""
    try:
        _, loops = instrument(code, hint=hint)
    except FlorError:
        return "x", "y"
    if loops.step_line:
        t = loop_at(parse(code), loops.step_line).target
        if isinstance(t, ast.Tuple) and len(t.elts) >= 2 and all(isinstance(e, ast.Name) for e in t.elts[:2]):
            return t.elts[0].id, t.elts[1].id
    return "x", "y"


def preset(run, key: str, params: dict | None = None, line: int | None = None, objs: dict | None = None,
           store=None) -> Probe:
    """A :class:`Probe` from preset ``key`` with ``params`` filled in, at ``line`` or its default place.

    Parameters not given are guessed from the run (``objs``: :func:`objects`, read if None).
    """
    if key not in PRESETS:
        raise FlorError(f"Unknown probe preset {key!r}. Presets: {', '.join(PRESETS)}.")
    framework = (recorded_loops(run.state) or {}).get("framework")
    if framework:  # no loop in the cell to place a preset in: the framework runs the steps
        raise FlorError(f"Run {run.label} trains with `{framework['call']}(...)`, so preset probes have no loop to go "
                        "in. Write flor.log in compute_loss / training_step or in a callback, and replay with "
                        "flor.replay(run, cells={count: edited_source}) or a pasted cell that adds the callback.")
    if objs is None:
        try:
            objs = objects(run, store)
        except (FlorError, OSError, RuntimeError):
            objs = {}
    p = PRESETS[key]
    values = {**preset_defaults(run, key, objs), **(params or {})}
    values["slug"] = re.sub(r"\W", "_", values.get("module") or "model") or "model"
    code = p.template.format(**values)
    indent = None
    if line is None:
        line, indent = default_place(run.code, p.where, hint(run))
    return Probe(line=line, code=code, preset=key, params={k: values[k] for k in p.params}, indent=indent)


def default_place(code: str, where: str, hint=None) -> tuple[int, int | None]:
    """(line, indent) a preset goes after: ``backward``, ``step_start``, ``epoch_end`` or ``before_loop``.

    ``indent`` is None where the statement at the line decides it.
    """
    _, loops = instrument(code, hint=hint)
    tree = parse(code)
    epoch = loop_at(tree, loops.epoch_line)
    lines = code.splitlines()
    if where == "before_loop":
        return epoch.lineno - 1, indent_of(lines[epoch.lineno - 1])
    if where == "step_start" and loops.step_line:
        return header_end(loop_at(tree, loops.step_line)), None
    if where in ("backward", "step_start"):
        for stmt, _ in statements(tree):
            if not is_block(stmt) and epoch.lineno < stmt.lineno <= epoch.end_lineno and ".backward(" in ast.unparse(stmt):
                return stmt.end_lineno, None
        if loops.step_line:
            return loop_at(tree, loops.step_line).end_lineno, None
    # after the epoch body's last statement, at the epoch body's indentation (not inside a trailing if)
    return epoch.end_lineno, indent_of(lines[epoch.body[0].lineno - 1])


