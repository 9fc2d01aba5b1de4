"""Keep every executed cell with the names it actually bound and the ``flor.arg`` values it set."""
from __future__ import annotations

from flor_nb import runtime
from flor_nb.cells import Cell, analyze, arg_names, strip_shell

_IGNORED = {"_", "__", "___", "_i", "_ii", "_iii", "_oh", "_dh", "_ih", "In", "Out", "exit", "quit", "get_ipython"}


def _ignored(name: str) -> bool:
    return name in _IGNORED or (name.startswith("_i") and name[2:].isdigit()) or (
        name.startswith("_") and name[1:].isdigit())


class CellTracker:
    """IPython ``pre_run_cell`` / ``post_run_cell`` hooks that diff the namespace around each cell.

    Text analysis alone misses names bound by a helper that declares ``global``
    or by ``from m import *``; comparing object ids before and after catches them.
    A cell that runs another (``%%capture`` does) is one cell: the inner run is part of it.
    """

    def __init__(self, ip):
        self.ip = ip
        self.cells: list[Cell] = []
        self._running: list = []  # (info, namespace ids before) of the cells running, outermost first
        # Cells run before %load_ext: their text is all we have (args: the latest value of each name they set).
        earlier = runtime.IDLE.args
        for count, raw in enumerate(ip.user_ns.get("_ih", [])[1:], start=1):
            cell = self._cell(count, raw, set())
            cell.args = {n: earlier[n] for n in arg_names(cell.source) if n in earlier}
            self.cells.append(cell)

    def _cell(self, count, raw, bound, args=None) -> Cell:
        try:
            # %%time / %%capture cells as their body, in Python
            source = strip_shell(self.ip.transform_cell(raw), self.ip.transform_cell)
        except Exception:  # noqa: BLE001 - a cell IPython cannot transform is not a dependency
            source = ""
        try:
            _, assigned = analyze(source)
        except SyntaxError:
            assigned = set()
        return Cell(count, source, {n for n in bound | assigned if not _ignored(n)}, args or {})

    def pre_run_cell(self, info):
        before = None
        if not self._running:
            before = {k: id(v) for k, v in self.ip.user_ns.items()}
            runtime.IDLE.begin_cell()  # flor.arg values from here on belong to this cell
        self._running.append((info, before))

    def post_run_cell(self, result):
        info = result.info if result is not None else None
        if self._running and self._running[-1][0] is info:
            _, before = self._running.pop()
        else:
            before = None  # an empty cell: IPython skips pre_run_cell for it
        if self._running:
            return  # run by the cell around it (%%capture): that cell covers it
        args = runtime.IDLE.end_cell()
        ns, before = self.ip.user_ns, before or {k: id(v) for k, v in self.ip.user_ns.items()}
        bound = {k for k, v in ns.items() if before.get(k) != id(v)}
        raw = info.raw_cell if info is not None else ""
        count = (result.execution_count if result is not None else None) or len(self.cells) + 1
        if self.cells and self.cells[-1].count == count:
            self.cells.pop()  # the %load_ext cell, seeded from the history before its hooks ran
        self.cells.append(self._cell(count, raw, bound, args))

    def register(self):
        self.ip.events.register("pre_run_cell", self.pre_run_cell)
        self.ip.events.register("post_run_cell", self.post_run_cell)

    def unregister(self):
        runtime.IDLE.end_cell()
        for name, fn in (("pre_run_cell", self.pre_run_cell), ("post_run_cell", self.post_run_cell)):
            try:
                self.ip.events.unregister(name, fn)
            except ValueError:
                pass
