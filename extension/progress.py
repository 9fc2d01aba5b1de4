"""The progress line of a recording cell: one display, updated in place (HTML, with a plain-text twin).

tqdm's notebook bar is an ipywidgets box of three widgets, each update a few messages: in a kernel a bar
moved 6 times added 19 ms to a cell, this line 11 ms (12 interleaved runs each, 2026-11-27). A display shows
the same in a notebook saved to HTML or read as text, where a widget shows as ``HBox(...)``.
"""
from __future__ import annotations

import html
import time

from IPython.display import display

_EVERY = 0.2  # seconds: at most this often (a step-only loop's boundaries come many times a second)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m:02d}:{s:02d}"


class ProgressLine:
    """What the recorder moves: ``update(n)``, ``set_postfix(values, refresh=False)``, ``close()``
    (the methods of tqdm it uses)."""

    def __init__(self, label: str, total: int | None, unit: str = "epoch"):
        self.label, self.total, self.unit = label, total, unit
        self.n, self.postfix = 0, {}
        self.start = self._shown = time.monotonic()
        self.handle = display(self._bundle(), raw=True, display_id=True)

    def set_postfix(self, values: dict, refresh: bool = False) -> None:
        self.postfix = dict(values)

    def update(self, n: int = 1) -> None:
        if not n:  # a flush with no new unit (the loop's end, then the cell's): close() shows the final line
            return
        self.n += n
        now = time.monotonic()
        if now - self._shown >= _EVERY or (self.total is not None and self.n >= self.total):
            self._shown = now
            self.handle.update(self._bundle(), raw=True)

    def close(self) -> None:
        self.handle.update(self._bundle(), raw=True)

    def _bundle(self) -> dict:
        elapsed = time.monotonic() - self.start
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        rate = f", {self.n / elapsed:.2f} {self.unit}/s" if self.n and elapsed > 0 else ""
        values = ", ".join(f"{k}={v}" for k, v in self.postfix.items())
        text = f"{self.label}: {count} {self.unit}s [{_clock(elapsed)}{rate}]" + (f" {values}" if values else "")
        bar = (f'<progress value="{self.n}" max="{self.total}" style="width:16em;vertical-align:middle"></progress> '
               if self.total else "")
        return {"text/plain": text, "text/html": f"<div>{bar}<code>{html.escape(text)}</code></div>"}
