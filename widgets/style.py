"""The panel's look: one stylesheet and HTML helpers.

Every color is a JupyterLab theme variable (with a light-theme fallback for
front ends without them), so the panel follows light, dark and high-contrast
themes. Tinted backgrounds mix a theme color into the theme's own background;
text keeps the theme's font color, so contrast holds in every theme. Plots are
PNGs with transparent backgrounds, drawn for a light background; in a dark
theme they are inverted (``filter``), which keeps their hues and turns their
black text and axes white.
"""
from __future__ import annotations

import html

# Theme variables with fallbacks: JupyterLab's light theme values.
_VARS = """
  --flor-fg: var(--jp-ui-font-color1, rgba(0,0,0,.87)); --flor-muted: var(--jp-ui-font-color2, rgba(0,0,0,.54));
  --flor-bg: var(--jp-layout-color1, #fff); --flor-bg2: var(--jp-layout-color2, #eee);
  --flor-border: var(--jp-border-color2, #e0e0e0);
  --flor-accent: var(--jp-brand-color1, #1976d2); --flor-link: var(--jp-content-link-color, #0d47a1);
  --flor-ok: var(--jp-success-color1, #388e3c); --flor-warn: var(--jp-warn-color1, #f57c00);
  --flor-bad: var(--jp-error-color1, #d32f2f);
  --flor-ok-bg: color-mix(in srgb, var(--flor-ok) 16%, var(--flor-bg));
  --flor-warn-bg: color-mix(in srgb, var(--flor-warn) 18%, var(--flor-bg));
  --flor-bad-bg: color-mix(in srgb, var(--flor-bad) 16%, var(--flor-bg));
  --flor-code: var(--jp-code-font-family, ui-monospace, SFMono-Regular, Menlo, monospace);
"""

CSS = """
<style>
.flor-panel, .flor-static {""" + _VARS + """
  color: var(--flor-fg); font-size: 13px; border: 1px solid var(--flor-border); border-radius: 6px;
  padding: 6px 12px 12px 12px; max-width: 1180px; box-sizing: border-box; }
.flor-panel { overflow-x: hidden; }
.flor-panel .widget-box { overflow-x: hidden; }  /* one scroll box only: the results table's own */
.flor-panel select, .flor-panel .jp-OutputArea-output, .flor-panel .widget-output { max-width: 100%;
  box-sizing: border-box; }
/* Notebook 7 puts an output taller than ~1,800 px into a 24em scroll box (its autoScrollOutputs): after a
   replay the panel would shrink to its first 300 px, Replay button and results scrolled away */
.jp-CodeCell.jp-mod-outputsScrolled .jp-Cell-outputArea:has(.flor-panel, .flor-static) { max-height: none;
  overflow-y: visible; }
.jp-CodeCell.jp-mod-outputsScrolled .jp-Cell-outputArea:has(.flor-panel, .flor-static)::after { display: none; }
/* a 100%-wide list plus its widget margin spilled 2 px past the panel, which hid its right border */
.flor-panel .widget-select { max-width: calc(100% - 2 * var(--jp-widgets-margin, 2px)); }
.flor-panel .flor-title, .flor-static .flor-title { font-size: 15px; font-weight: 600; }
.flor-panel .flor-muted, .flor-static .flor-muted { color: var(--flor-muted); }
.flor-panel .flor-section { margin: 12px 0 4px 0; padding-top: 6px; border-top: 1px solid var(--flor-border);
  font-weight: 600; font-size: 13px; letter-spacing: .2px; }
.flor-panel .flor-section .flor-step { display: inline-block; min-width: 18px; height: 18px; line-height: 18px;
  text-align: center; border-radius: 9px; background: var(--flor-bg2); border: 1px solid var(--flor-accent);
  color: var(--flor-fg); font-size: 11px; margin-right: 6px; }
.flor-panel .flor-hint { color: var(--flor-muted); font-size: 12px; font-weight: normal; margin-left: 6px; }
.flor-mono select, .flor-mono textarea, .flor-mono input { font-family: var(--flor-code) !important;
  font-size: 12px !important; }
.flor-mono select { overflow-x: hidden; }
.flor-mono select option { white-space: pre; overflow: hidden; text-overflow: ellipsis; }
.flor-panel pre.flor-code, .flor-static pre.flor-code { font-family: var(--flor-code); font-size: 12px;
  line-height: 1.45; margin: 0; padding: 6px 0; background: var(--flor-bg2); color: var(--flor-fg);
  border: 1px solid var(--flor-border); border-radius: 4px; white-space: pre-wrap; overflow-wrap: anywhere;
  max-height: 360px; overflow-y: auto; }
.flor-panel pre.flor-code span.ln { display: inline-block; width: 3.2em; padding-right: .8em; text-align: right;
  color: var(--flor-muted); user-select: none; }
.flor-panel pre.flor-code span.add { background: var(--flor-ok-bg); display: block; }
.flor-panel pre.flor-code span.err { background: var(--flor-bad-bg); display: block; }
.flor-panel pre.flor-code span.msg { font-style: italic; }
.flor-panel .flor-probe { font-family: var(--flor-code); font-size: 12px; }
.flor-panel .flor-probe.bad::before { content: "\\2716 "; color: var(--flor-bad); }
.flor-panel .flor-problem { font-size: 12px; border-left: 3px solid var(--flor-bad); padding-left: 6px; }
.flor-panel .flor-estimate { background: var(--flor-bg2); border-left: 3px solid var(--flor-accent);
  padding: 6px 10px; line-height: 1.5; border-radius: 3px; }
.flor-panel .flor-estimate.flor-problem { border-left-color: var(--flor-bad); background: var(--flor-bad-bg); }
.flor-panel .flor-status { font-size: 12px; }
.flor-panel .flor-status .dot { font-size: 11px; margin-right: 3px; }
.flor-panel .flor-status.ok .dot { color: var(--flor-ok); } .flor-panel .flor-status.bad .dot { color: var(--flor-bad); }
.flor-panel .flor-status.busy .dot { color: var(--flor-accent); } .flor-panel .flor-status.warn .dot { color: var(--flor-warn); }
.flor-panel .flor-chips span { display: inline-block; padding: 1px 7px; margin: 2px 3px 0 0; border-radius: 9px;
  font-size: 11px; border: 1px solid var(--flor-border); }
.flor-panel .flor-chips span.ran { background: var(--flor-bg2); border-color: var(--flor-ok); border-style: dashed; }
.flor-panel .flor-chips span.done { background: var(--flor-ok-bg); border-color: var(--flor-ok); }
.flor-panel .flor-chips span.lost { background: var(--flor-warn-bg); border-color: var(--flor-warn); }
.flor-panel .flor-chips span.failed { background: var(--flor-bad-bg); border-color: var(--flor-bad); }
.flor-badge { display: inline-block; padding: 2px 9px; border-radius: 10px; font-size: 12px; font-weight: 600;
  border: 1px solid var(--flor-border); color: var(--flor-fg); }
.flor-badge.ok { background: var(--flor-ok-bg); border-color: var(--flor-ok); }
.flor-badge.warn { background: var(--flor-warn-bg); border-color: var(--flor-warn); }
.flor-badge.bad { background: var(--flor-bad-bg); border-color: var(--flor-bad); }
.flor-verdict { padding: 8px 12px; border-radius: 4px; margin: 4px 0; line-height: 1.45; color: var(--flor-fg);
  border-left: 4px solid var(--flor-border); background: var(--flor-bg2); }
.flor-verdict.ok { background: var(--flor-ok-bg); border-left-color: var(--flor-ok); }
.flor-verdict.bad { background: var(--flor-bad-bg); border-left-color: var(--flor-bad); }
.flor-verdict.warn { background: var(--flor-warn-bg); border-left-color: var(--flor-warn); }
.flor-verdict table { border-collapse: collapse; margin-top: 6px; font-size: 12px; }
.flor-verdict td, .flor-verdict th { padding: 2px 10px 2px 0; text-align: left; color: var(--flor-fg); }
.flor-table-wrap { max-height: 420px; overflow: auto; border: 1px solid var(--flor-border); border-radius: 4px; }
.flor-table-wrap table.dataframe { border-collapse: collapse; font-size: 12px; min-width: 100%; }
.flor-table-wrap table.dataframe th { position: sticky; top: 0; background: var(--flor-bg); color: var(--flor-fg);
  z-index: 1; text-align: right; padding: 4px 10px; border-bottom: 1px solid var(--flor-border); }
.flor-table-wrap table.dataframe th.probe { color: var(--flor-link); }
.flor-table-wrap table.dataframe th.probe::after { content: " \\25C6"; font-size: 9px; }
.flor-table-wrap table.dataframe td { text-align: right; padding: 2px 10px; font-variant-numeric: tabular-nums;
  white-space: nowrap; font-family: var(--flor-code); color: var(--flor-fg); }
.flor-table-wrap table.dataframe tr:nth-child(even) td { background: var(--flor-bg2); }
.flor-table-wrap table.dataframe td.na { color: var(--flor-muted); }
.flor-error { border-left: 4px solid var(--flor-bad); background: var(--flor-bad-bg); color: var(--flor-fg);
  padding: 6px 10px; margin: 4px 0; }
.flor-error pre { white-space: pre-wrap; font-size: 12px; margin: 4px 0 0 0; color: var(--flor-fg);
  max-height: 320px; overflow-y: auto; }
.flor-panel a, .flor-static a { color: var(--flor-link); }
.flor-plot img, img.flor-plot, .flor-curve-img img { background: transparent; max-width: 100%; }
body[data-jp-theme-light="false"] .flor-plot img, body[data-jp-theme-light="false"] img.flor-plot,
body[data-jp-theme-light="false"] .flor-curve-img img { filter: invert(1) hue-rotate(180deg); }
</style>
"""


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def section(step: str, title: str, hint: str = "") -> str:
    h = f'<span class="flor-hint">{esc(hint)}</span>' if hint else ""
    return f'<div class="flor-section"><span class="flor-step">{esc(step)}</span>{esc(title)}{h}</div>'


def code_block(source: str, first: int = 1, added=(), errors: dict | None = None) -> str:
    """Source with line numbers; ``added`` lines are green, ``errors`` ({line: message}) red."""
    errors = errors or {}
    rows = []
    for n, line in enumerate(source.splitlines(), start=first):
        text = f'<span class="ln">{n}</span>{esc(line) or " "}'
        if n in errors:
            text += f'  <span class="msg">\u2190 {esc(errors[n])}</span>'
            rows.append(f'<span class="err">{text}</span>')
        elif n in added:
            rows.append(f'<span class="add">{text}</span>')
        else:
            rows.append(text + "\n")
    return f'<pre class="flor-code">{"".join(rows)}</pre>'


def badge(kind: str, text: str) -> str:
    """A small colored label: kind is ok, warn or bad."""
    return f'<span class="flor-badge {kind}">{esc(text)}</span>'
