"""The active session behind ``flor.log``, ``flor.arg`` and ``flor.loop``.

Outside recording and replay the session is :class:`Idle`: ``log`` and ``arg``
return their value (``arg`` also remembers it, for the run it belongs to). A
:class:`~flor_nb.recorder.Recorder` or :class:`~flor_nb.replayer.Replayer`
replaces it for the duration of one cell.
"""
from __future__ import annotations

import json
import math
from numbers import Number

import numpy as np

try:
    import torch
except ImportError:  # pragma: no cover - torch is a dependency, but logging works without it
    torch = None


class Idle:
    """No run active: values pass through; hyperparameters are remembered for the run they belong to.

    In a kernel the extension brackets each cell (:meth:`begin_cell`, :meth:`end_cell`), so each
    cell keeps the args it set and a run takes those of its dependency cells. A script's record
    takes the args set since the previous record began (:meth:`take_args`).
    """

    def __init__(self):
        self.args: dict = {}  # set since the last record began
        self.cell: dict | None = None  # set by the cell running now, when the extension says which

    def log(self, name, value):
        return value

    def arg(self, name, default):
        from .validate import arg_value

        stored = arg_value(name, default)  # checked now: a bad value must not reach (and stop) the next record
        self.args[name] = stored
        if self.cell is not None:
            self.cell[name] = stored
        return default

    def begin_cell(self):
        self.cell = {}

    def end_cell(self) -> dict:
        """The args the cell that just ran set."""
        out, self.cell = self.cell or {}, None
        return out

    def take_args(self) -> dict:
        """The args set since the last call (a record takes them, so the next one starts empty)."""
        out, self.args = self.args, {}
        return out

    def loop(self, name, iterable):
        return iterable


class While:
    """A ``while`` loop's condition as an iterable: a recorded ``while cond:`` runs as
    ``for _ in flor.loop("epoch", While(lambda: cond)):``, with the same ``break``, ``continue``
    and ``else`` behaviour, so it records (and replays) iteration by iteration."""

    __slots__ = ("cond",)

    def __init__(self, cond):
        self.cond = cond

    def __iter__(self):
        cond = self.cond
        while cond():
            yield None


IDLE = Idle()
_session = IDLE


def active():
    return _session


def activate(session):
    """Make ``session`` current; returns the previous one for :func:`deactivate`."""
    global _session
    previous, _session = _session, session
    return previous


def deactivate(previous):
    global _session
    _session = previous


def log(name: str, value):
    """Log ``value`` under ``name`` at the current epoch and step; return ``value``."""
    return _session.log(name, value)


def arg(name: str, default):
    """A hyperparameter: recorded with the run whose cells set it; in replay, the recorded value."""
    return _session.arg(name, default)


def loop(name: str, iterable):
    """Mark the epoch loop (``name="epoch"``) or the step loop (``"step"``)."""
    return _session.loop(name, iterable)


def carry(names: tuple, local: dict) -> dict:
    """A helper's variables that its code after the step loop reads (see ``edits.helper_reads_after_steps``), as
    the instrumented helper assigns them after the loop: the recording keeps them with the step loop's exit state;
    a replay that skipped the loop gives them back."""
    own = getattr(_session, "carry", None)
    return own(names, local) if own is not None else bound_names(names, local)


def bound_names(names, local: dict) -> dict:
    """Those of ``names`` that ``local`` binds (a name the loop left unbound stays so)."""
    return {n: local[n] for n in names if n in local}


def fit(trainer, method: str, *args, **kwargs):
    """``trainer.train(...)`` (HF) / ``trainer.fit(...)`` (Lightning) as an instrumented cell calls it:
    recorded or replayed epoch by epoch by the active session (see :mod:`flor_nb.frameworks`)."""
    from . import frameworks

    return frameworks.fit(_session, trainer, method, args, kwargs)


# -- value encoding ---------------------------------------------------------
def scalarize(value):
    """Turn 0-d tensors and numpy scalars into Python numbers now (the tensor may change later).

    Returns the value to keep: a Python scalar, a numpy array copy, or the value itself.
    """
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if torch is not None and isinstance(value, torch.Tensor):
        if value.numel() == 1 and value.dim() == 0:
            return value.item()
        return value.detach().cpu().numpy().copy()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.item() if value.ndim == 0 else value.copy()
    return value


def to_json(value) -> str:
    if type(value) is float:  # the common case, ~5x faster than json.dumps (repr is valid JSON, NaN aside)
        return repr(value) if value == value and value not in (math.inf, -math.inf) else json.dumps(value)
    if type(value) is int:
        return str(value)
    return json.dumps(value, default=_fallback, allow_nan=True)


def _fallback(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return repr(obj)


def encode(value):
    """A logged value as stored: finite floats and ints as SQLite numbers, the rest as JSON text."""
    t = type(value)
    if (t is float and value - value == 0) or (t is int and -(2 ** 63) <= value < 2 ** 63):
        return value  # value - value is nan for inf and nan, which go through JSON
    return to_json(value)


def from_json(text):
    """Decode a stored value (JSON text, or a number stored as such)."""
    return json.loads(text) if isinstance(text, str) else text


def same(a, b) -> bool:
    """Exact equality of logged values, with NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def abs_diff(a, b) -> float | None:
    if isinstance(a, Number) and isinstance(b, Number) and not isinstance(a, bool):
        return abs(float(a) - float(b))
    return None
