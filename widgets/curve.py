"""The metric curve that picks epochs: click an epoch, shift/ctrl-click to add, drag across a range.

An ``anywidget`` drawing SVG in the browser, so it follows the theme (its colors
are JupyterLab's CSS variables) and answers clicks without a round trip per
pixel. ``selected`` syncs both ways: the panel's epoch field sets it, a click or
drag sets it back.
"""
from __future__ import annotations

import anywidget
import traitlets

_ESM = r"""
const NS = "http://www.w3.org/2000/svg";
function el(tag, attrs, parent) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}
function render({ model, el: root }) {
  root.classList.add("flor-curve");
  const W = 720, H = 190, L = 58, R = 14, T = 12, B = 34;
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img" }, root);
  svg.style.maxWidth = W + "px"; svg.style.cursor = "crosshair"; svg.style.userSelect = "none";
  const hint = document.createElement("div");
  hint.className = "flor-curve-hint";
  root.appendChild(hint);
  let drag = null, anchor = null;
  const n = () => Math.max(model.get("n_epochs"), 1);
  const x = (e) => L + (n() === 1 ? (W - L - R) / 2 : (e * (W - L - R)) / (n() - 1));
  const epochAt = (evt) => {
    const box = svg.getBoundingClientRect();
    const px = ((evt.clientX - box.left) / box.width) * W;
    const e = n() === 1 ? 0 : Math.round(((px - L) / (W - L - R)) * (n() - 1));
    return Math.min(Math.max(e, 0), n() - 1);
  };
  function draw(preview) {
    svg.replaceChildren();
    const pts = model.get("points"), sel = new Set(preview || model.get("selected"));
    const ys = pts.map((p) => p[1]).filter((v) => v !== null && isFinite(v));
    let lo = Math.min(...ys), hi = Math.max(...ys);
    if (!ys.length) { lo = 0; hi = 1; }
    if (hi === lo) { hi += 0.5; lo -= 0.5; }
    const y = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
    const half = n() === 1 ? (W - L - R) / 2 : (W - L - R) / (n() - 1) / 2;
    for (let e = 0; e < n(); e++) {
      const x0 = Math.max(x(e) - half, L), x1 = Math.min(x(e) + half, W - R);
      const band = el("rect", { x: x0, y: T, width: x1 - x0, height: H - T - B,
        class: sel.has(e) ? "band picked" : "band", "data-epoch": e }, svg);
      el("title", {}, band).textContent = `epoch ${e}`;
    }
    el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }, svg);
    el("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }, svg);
    const step = Math.max(1, Math.ceil(n() / 20));
    for (let e = 0; e < n(); e += step) {
      el("text", { x: x(e), y: H - B + 14, class: "tick", "text-anchor": "middle" }, svg).textContent = e;
    }
    for (const v of [lo, (lo + hi) / 2, hi]) {
      el("text", { x: L - 6, y: y(v) + 4, class: "tick", "text-anchor": "end" }, svg).textContent =
        Math.abs(v) >= 1000 || (Math.abs(v) < 0.01 && v !== 0) ? v.toExponential(1) : +v.toPrecision(3);
    }
    el("text", { x: (L + W - R) / 2, y: H - 4, class: "label", "text-anchor": "middle" }, svg).textContent =
      "epoch (click to pick, drag for a range, shift/ctrl-click to add)";
    el("text", { x: 12, y: (T + H - B) / 2, class: "label", "text-anchor": "middle",
      transform: `rotate(-90 12 ${(T + H - B) / 2})` }, svg).textContent = model.get("label");
    const line = pts.filter((p) => p[1] !== null).map((p) => `${x(p[0])},${y(p[1])}`).join(" ");
    if (line) el("polyline", { points: line, class: "curve" }, svg);
    for (const [e, v] of pts) {
      if (v === null) continue;
      const c = el("circle", { cx: x(e), cy: y(v), r: sel.has(e) ? 5 : 3.2, class: sel.has(e) ? "pt picked" : "pt",
        "data-epoch": e }, svg);
      el("title", {}, c).textContent = `epoch ${e}: ${v}`;
    }
    if (!pts.length) {
      el("text", { x: W / 2, y: H / 2, class: "label", "text-anchor": "middle" }, svg).textContent =
        "no recorded scalar metric: pick epochs by number";
    }
    const s = [...sel].sort((a, b) => a - b);
    hint.textContent = s.length ? `selected: ${s.join(", ")}` : "no epoch selected";
  }
  const range = (a, b) => Array.from({ length: Math.abs(b - a) + 1 }, (_, i) => Math.min(a, b) + i);
  svg.addEventListener("pointerdown", (evt) => {
    drag = { start: epochAt(evt), moved: false, evt };
    svg.setPointerCapture(evt.pointerId);
  });
  svg.addEventListener("pointermove", (evt) => {
    if (!drag) return;
    const e = epochAt(evt);
    if (e !== drag.start) drag.moved = true;
    if (drag.moved) draw(range(drag.start, e));
  });
  svg.addEventListener("pointerup", (evt) => {
    if (!drag) return;
    const e = epochAt(evt), cur = new Set(model.get("selected"));
    let next;
    if (drag.moved) next = range(drag.start, e);
    else if (evt.shiftKey && anchor !== null) next = [...new Set([...cur, ...range(anchor, e)])];
    else if (evt.ctrlKey || evt.metaKey) { cur.has(e) ? cur.delete(e) : cur.add(e); next = [...cur]; }
    else next = [e];
    anchor = e;
    drag = null;
    model.set("selected", next.sort((a, b) => a - b));
    model.save_changes();
    draw();
  });
  model.on("change:points", () => draw());
  model.on("change:selected", () => draw());
  model.on("change:n_epochs", () => draw());
  model.on("change:label", () => draw());
  draw();
}
export default { render };
"""

_CSS = """
.flor-curve { color: var(--jp-ui-font-color1, #222); }
.flor-curve svg .band { fill: transparent; }
.flor-curve svg .band:hover { fill: color-mix(in srgb, var(--jp-brand-color1, #1976d2) 10%, transparent); }
.flor-curve svg .band.picked { fill: color-mix(in srgb, var(--jp-warn-color1, #f57c00) 26%, transparent); }
.flor-curve svg .axis { stroke: var(--jp-border-color1, #bdbdbd); stroke-width: 1; }
.flor-curve svg .tick, .flor-curve svg .label { fill: var(--jp-ui-font-color1, #222); font-size: 11px;
  font-family: var(--jp-ui-font-family, sans-serif); }
.flor-curve svg .label { fill: var(--jp-ui-font-color2, #666); }
.flor-curve svg .curve { fill: none; stroke: var(--jp-brand-color1, #1976d2); stroke-width: 1.6; }
.flor-curve svg .pt { fill: var(--jp-brand-color1, #1976d2); }
.flor-curve svg .pt.picked { fill: var(--jp-warn-color1, #f57c00); stroke: var(--jp-ui-font-color1, #222); }
.flor-curve .flor-curve-hint { font-size: 12px; color: var(--jp-ui-font-color2, #666); margin-left: 58px; }
"""


class EpochCurve(anywidget.AnyWidget):
    """A recorded metric per epoch; ``selected`` is the epochs picked on it."""

    _esm = _ESM
    _css = _CSS
    points = traitlets.List([]).tag(sync=True)  # [[epoch, value or None], ...]
    n_epochs = traitlets.Int(0).tag(sync=True)
    selected = traitlets.List(traitlets.Int(), []).tag(sync=True)
    label = traitlets.Unicode("").tag(sync=True)
