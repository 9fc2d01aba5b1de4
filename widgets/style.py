"""The panel's look: one stylesheet (JupyterLab theme variables, with fallbacks) and HTML helpers."""
from __future__ import annotations

import html

CSS = """
<style>
.flor-panel { --flor-fg: var(--jp-ui-font-color1, #1f2328); --flor-muted: var(--jp-ui-font-color2, #656d76);
  --flor-border: var(--jp-border-color2, #d0d7de); --flor-bg2: var(--jp-layout-color2, #f6f8fa);
  --flor-accent: var(--jp-brand-color1, #1976d2); --flor-ok: #1a7f37; --flor-bad: #cf222e;
  --flor-code: var(--jp-code-font-family, ui-monospace, SFMono-Regular, Menlo, monospace);
  color: var(--flor-fg); font-size: 13px; border: 1px solid var(--flor-border); border-radius: 6px;
  padding: 6px 12px 12px 12px; max-width: 1180px; }
.flor-panel .flor-title { font-size: 15px; font-weight: 600; }
.flor-panel .flor-muted { color: var(--flor-muted); }
.flor-panel .flor-section { margin: 12px 0 4px 0; padding-top: 6px; border-top: 1px solid var(--flor-border);
  font-weight: 600; font-size: 13px; letter-spacing: .2px; }
.flor-panel .flor-section .flor-step { display: inline-block; min-width: 18px; height: 18px; line-height: 18px;
  text-align: center; border-radius: 9px; background: var(--flor-accent); color: white; font-size: 11px;
  margin-right: 6px; }
.flor-panel .flor-hint { color: var(--flor-muted); font-size: 12px; font-weight: normal; margin-left: 6px; }
.flor-mono select, .flor-mono textarea, .flor-mono input { font-family: var(--flor-code) !important; font-size: 12px !important; }
.flor-mono select option { white-space: pre; }
.flor-panel pre.flor-code { font-family: var(--flor-code); font-size: 12px; line-height: 1.45; margin: 0;
  padding: 6px 0; background: var(--flor-bg2); border: 1px solid var(--flor-border); border-radius: 4px;
  overflow-x: auto; max-height: 360px; }
.flor-panel pre.flor-code span.ln { display: inline-block; width: 3.2em; padding-right: .8em; text-align: right;
  color: var(--flor-muted); user-select: none; }
.flor-panel pre.flor-code span.add { background: rgba(46, 160, 67, .18); display: block; }
.flor-panel pre.flor-code span.err { background: rgba(207, 34, 46, .16); display: block; }
.flor-panel pre.flor-code span.msg { color: var(--flor-bad); font-style: italic; }
.flor-panel .flor-probe { font-family: var(--flor-code); font-size: 12px; }
.flor-panel .flor-probe.bad { color: var(--flor-bad); }
.flor-panel .flor-problem { color: var(--flor-bad); font-size: 12px; }
.flor-panel .flor-estimate { background: var(--flor-bg2); border-left: 3px solid var(--flor-accent);
  padding: 6px 10px; line-height: 1.5; border-radius: 3px; }
.flor-panel .flor-status { font-size: 12px; }
.flor-panel .flor-status.ok { color: var(--flor-ok); } .flor-panel .flor-status.bad { color: var(--flor-bad); }
.flor-panel .flor-status.busy { color: var(--flor-accent); }
.flor-panel .flor-chips span { display: inline-block; padding: 1px 7px; margin: 2px 3px 0 0; border-radius: 9px;
  font-size: 11px; border: 1px solid var(--flor-border); }
.flor-panel .flor-chips span.done { background: rgba(46, 160, 67, .15); border-color: rgba(46, 160, 67, .5); }
.flor-panel .flor-chips span.lost { background: rgba(207, 34, 46, .10); border-color: rgba(207, 34, 46, .4); }
.flor-verdict { padding: 8px 12px; border-radius: 4px; margin: 4px 0; line-height: 1.45; }
.flor-verdict.ok { background: rgba(46, 160, 67, .12); border-left: 4px solid #1a7f37; }
.flor-verdict.bad { background: rgba(207, 34, 46, .10); border-left: 4px solid #cf222e; }
.flor-verdict.warn { background: rgba(212, 167, 44, .14); border-left: 4px solid #bf8700; }
.flor-verdict table { border-collapse: collapse; margin-top: 6px; font-size: 12px; }
.flor-verdict td, .flor-verdict th { padding: 2px 10px 2px 0; text-align: left; }
.flor-table-wrap { max-height: 420px; overflow: auto; border: 1px solid var(--jp-border-color2, #d0d7de);
  border-radius: 4px; }
.flor-table-wrap table.dataframe { border-collapse: collapse; font-size: 12px; width: max-content; min-width: 100%; }
.flor-table-wrap table.dataframe th { position: sticky; top: 0; background: var(--jp-layout-color2, #f6f8fa);
  z-index: 1; text-align: right; padding: 4px 10px; border-bottom: 1px solid var(--jp-border-color2, #d0d7de); }
.flor-table-wrap table.dataframe th.probe { color: #174a7c; }
.flor-table-wrap table.dataframe td { text-align: right; padding: 2px 10px; font-variant-numeric: tabular-nums;
  white-space: nowrap; font-family: var(--jp-code-font-family, monospace); }
.flor-table-wrap table.dataframe tr:nth-child(even) td { background: rgba(127, 127, 127, .06); }
.flor-table-wrap table.dataframe td.na { color: transparent; }
.flor-error { border-left: 4px solid #cf222e; background: rgba(207, 34, 46, .07); padding: 6px 10px; }
.flor-error pre { white-space: pre-wrap; font-size: 12px; margin: 4px 0 0 0; }
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
