"""How an object met in the capture walk is saved: by its own API (its kind), by value, rebuilt as code or
data, left to the cells as an output, or not at all (and why)."""
from __future__ import annotations

import io
import socket
import sqlite3
import threading
import types
import weakref

import numpy as np
import torch

from . import frameworks

ATOMIC = (type(None), bool, int, float, complex, str, bytes, np.bool_, np.number, torch.dtype, torch.device,
          torch.Size, range, slice, type(Ellipsis))
_ATOMIC_TYPES = frozenset(t for t in ATOMIC if t not in (np.number,))
CODE = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType, type,
        types.MethodWrapperType, types.WrapperDescriptorType, types.MethodDescriptorType,
        types.BuiltinMethodType, staticmethod, classmethod, property)
DATA = (torch.utils.data.DataLoader, torch.utils.data.Dataset, torch.utils.data.Sampler)
_LOCKS = (type(threading.Lock()), type(threading.RLock()), threading.Condition, threading.Event,
          threading.Semaphore, threading.Thread)
_UNSAVEABLE = {
    types.GeneratorType: "a generator: its position in the loop cannot be saved",
    types.CoroutineType: "a coroutine cannot be saved",
    types.AsyncGeneratorType: "an async generator cannot be saved",
    types.FrameType: "a frame cannot be saved",
    types.TracebackType: "a traceback cannot be saved",
    memoryview: "a memoryview cannot be saved",
    weakref.ref: "a weak reference cannot be saved",
}


def kind_of(obj) -> str | None:
    """How an object's state is saved, or None when it is saved by value."""
    if isinstance(obj, torch.nn.Module):
        return "module"
    if isinstance(obj, torch.optim.Optimizer):
        return "optimizer"
    if isinstance(obj, torch.Generator):
        return "torch_generator"
    if isinstance(obj, np.random.Generator):
        return "np_generator"
    if isinstance(obj, np.random.RandomState):
        return "np_randomstate"
    if isinstance(obj, (type,) + DATA):
        return None
    fw = frameworks.kind(obj)  # a framework's trainer; or a framework object saved another way
    if fw is not None:
        return "framework" if fw == "framework" else None
    t = type(obj)
    if callable(getattr(t, "state_dict", None)) and callable(getattr(t, "load_state_dict", None)):
        return "stateful"  # LR schedulers, grad scalers, and any object that declares its own state
    return None


_OUTPUT_MODULES = ("tqdm", "wandb", "mlflow", "torch.utils.tensorboard", "tensorboardX", "logging")


def output_kind(obj) -> str | None:
    """What an output-only object is (a progress bar, a log file, a metrics writer), or None.

    Outputs are rebuilt by the recorded cells, not restored: they do not feed training.
    """
    t = type(obj)
    if isinstance(obj, io.IOBase):
        return "an open file"
    module = t.__module__ or ""
    if module.startswith(("lightning", "pytorch_lightning")) and frameworks.kind(obj) == "output":
        return f"a lightning {t.__name__}"  # checkpoint writers, loggers, progress bars
    if module.startswith(_OUTPUT_MODULES) and not isinstance(obj, type):
        return f"a {module.partition('.')[0]} {t.__name__}"
    return None


def unsaveable(obj) -> str | None:
    """Why ``obj`` cannot be saved, or None."""
    t = type(obj)
    reason = _UNSAVEABLE.get(t)
    if reason:
        return reason
    if isinstance(obj, _LOCKS):
        return f"a {t.__name__} (threading) cannot be saved"
    if isinstance(obj, (socket.socket, sqlite3.Connection, sqlite3.Cursor)):
        return f"a {t.__name__} (a connection) cannot be saved"
    if isinstance(obj, torch.utils.data.dataloader._BaseDataLoaderIter):
        return "a DataLoader iterator kept across epochs: its position in the data cannot be saved"
    return None


def _unsaveable(obj) -> bool:
    """Objects the pickler leaves out (the live ones stay): unsaveable ones and outputs."""
    return unsaveable(obj) is not None or output_kind(obj) is not None
