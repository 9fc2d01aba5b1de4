"""What runs inside a replay worker process: rebuild the namespace, restore, re-execute."""
from __future__ import annotations

import contextlib
import io
import logging
import linecache
import os
import signal
import tempfile
import sys
import time
import traceback
import types
from pathlib import Path

import numpy as np

from . import (cpu_math, devices, freshness, lifeline, probe_rng, probe_state, replay_events, runtime, setup_check,
               signing, state)
from .clock import ClockAttrs
from .cells import analyze, strip_shell
from .errors import FlorError, ReplayError
from .edits import helper_code
from .instrument import RUNTIME, instrument
from .replay_events import emit
from .replayer import Replayer, _ReplayDone
from .rows import save_array
from .sideeffects import WriteWatch

logger = logging.getLogger(__name__)

# Writes that are not the user's files: caches of libraries (torch.compile, matplotlib), the interpreter.
# torch.compile's C++ backend also writes headers into fresh tempfile.mkdtemp() folders and probes /dev/null.
_NOT_USER_FILES = [os.path.expanduser("~/.cache"), os.path.expanduser("~/.config/matplotlib"), sys.prefix,
                   os.path.join(tempfile.gettempdir(), "torchinductor_"), os.path.join(tempfile.gettempdir(), "tmp"),
                   os.devnull]


def init(queue, owner=None):
    """Pool initializer: the progress queue; exit when ``owner`` (the kernel) dies."""
    replay_events.use(queue)
    # Progress events are best effort: a worker exits without flushing them. Otherwise a worker whose
    # unread events filled the pipe never exits, and the kernel (or pytest) waiting for the pool at
    # shutdown hangs with it (seen at the end of a full test run: Queue._finalize_join in the worker).
    if hasattr(queue, "cancel_join_thread"):  # a multiprocessing queue (the Dask path passes none)
        queue.cancel_join_thread()
    # Jupyter interrupts a kernel by signalling its process group: a warm worker must not die of it (the
    # kernel cancels a running replay itself, see executor.cancel).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if owner is not None:
        lifeline.watch(owner)
    import warnings

    # A skipped step loop never calls opt.step(), so torch warns about the scheduler order; it is fine.
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")


def warm_up(modules=()):
    """Import what replays will need and run a first torch op, so the next task starts warm."""
    import importlib

    import torch

    cpu_math.settle()  # before the first parallel op below makes torch's second thread (see cpu_math)
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module that fails here fails, with its message, in the replay
            pass

    torch.nn.functional.conv2d(torch.ones(1, 1, 8, 8), torch.ones(1, 1, 3, 3)).sum().item()
    freshness.remember()
    return os.getpid()


def run_segment(task: dict) -> dict:
    """Replay one segment; returns logged rows, divergences and timings."""
    import torch

    import flor_nb

    emit({"started": task["replay_id"], "segment": task["segment"]["first"], "pid": os.getpid()})
    torch.set_num_threads(task["threads"])  # the recorded count: float reductions depend on it
    cpu_math.settle()  # exact vector math from the first call (a worker started without a warm-up)
    _start_method(task.get("start_method"))
    if task.get("key"):
        signing.use_key(task["key"])
    freshness.evict_stale()  # a user module edited since this warm worker imported it is imported again
    gpu = task.get("gpu") or {}
    # the recorded determinism settings, before the cells start CUDA; device="cpu" hides CUDA from the cells
    with _cwd(task.get("cwd")), devices.replay_context(task.get("device"), gpu.get("flags")) as failed:
        result = _run_segment(task, flor_nb)
    result["devices"]["flag_problems"] = sorted(set(result["devices"]["flag_problems"]) | set(failed))
    return result


def _start_method(recorded):
    """DataLoader workers start as they did in the recording kernel (fork, on Linux). A process started by a
    forkserver inherits forkserver as its default, whose children cannot unpickle a Dataset class defined in
    a notebook cell (it lives in the rebuilt __main__ of this worker only)."""
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    method = recorded if recorded in methods and recorded == "fork" else ("fork" if "fork" in methods else None)
    if method and multiprocessing.get_start_method(allow_none=True) != method:
        multiprocessing.set_start_method(method, force=True)


@contextlib.contextmanager
def _cwd(path):
    before = os.getcwd()
    if path and os.path.isdir(path):
        os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _run_segment(task: dict, flor_nb) -> dict:
    began_ns = time.time_ns()
    t0 = time.perf_counter()
    rep = Replayer(task)
    main = types.ModuleType("__main__")
    saved_main = sys.modules.get("__main__")
    sys.modules["__main__"] = main  # classes defined in cells unpickle as __main__.X, as recorded
    ns = rep.ns = main.__dict__
    ns["flor"] = ns[RUNTIME] = flor_nb
    previous = runtime.activate(rep)
    try:
        output = io.StringIO()  # what the cells print (model reprs, config, warnings): kept, not echoed
        for cell in task["cells"]:
            src = strip_shell(cell["source"])
            name = f"<cell In[{cell['count']}]>"
            linecache.cache[name] = (len(src), None, src.splitlines(keepends=True), name)
            try:
                with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                    exec(compile(probe_rng.guarded_cell(src, cell), name, "exec"), ns)
            except Exception as e:
                printed = output.getvalue()[-4000:]
                raise ReplayError(
                    f"Cell In[{cell['count']}] failed while rebuilding the namespace for replay: "
                    f"{type(e).__name__}: {e}. Pass a fixed version with cells={{{cell['count']}: '...'}}."
                    + (f"\n\nWhat the cells printed before:\n{printed}" if printed.strip() else ""),
                    _user_traceback(),
                ) from None
        rep.setup_output = output.getvalue()
        rebuilt = setup_check.compare(ns, task["code"], task.get("setup_digests"), task.get("roots") or (),
                                      task["cells"])
        setup_seconds = time.perf_counter() - t0
        rep.setup = False
        tree, _ = instrument(task["code"], hint=task.get("loops"))
        probe_rng.guard(tree, task.get("recorded_code") or task["code"], task["code"])  # probes leave RNGs be
        helper = (task.get("loops") or {}).get("helper")
        if helper is not None:  # the step loop is in a function a cell defined: wrap it there, as recorded
            fn = ns.get(helper["name"])
            cell = next(c for c in task["cells"] if c["count"] == helper["cell"])
            if isinstance(fn, types.FunctionType):
                fn.__code__ = helper_code(strip_shell(cell["source"]), helper, fn.__code__.co_filename,
                                          recorded=strip_shell(cell.get("recorded_source") or cell["source"]))
        free, assigned = analyze(task["code"])
        rep.scope = state.Scope(assigned=assigned, free=free, **task.get("scope", {}))
        rep.capturer = state.Capturer(ns, rep.scope, order=task.get("roots") or (), limits=task.get("limits"))
        rep.capturer.clock_attrs = ClockAttrs(task.get("clock_attrs"), analyze=False)  # the recording's, exactly
        rep.capturer.device_map = devices.DeviceMap(task.get("device"))
        kept = probe_state.for_segment(ns, task.get("recorded_code") or task["code"], task["code"], task["cells"],
                                       task.get("roots") or (), rep.capturer.limits) if rep.first > 0 else None
        filename = f"<flor replay {task['label']}>"
        linecache.cache[filename] = (len(task["code"]), None, task["code"].splitlines(keepends=True), filename)
        try:
            cwd = os.path.abspath(task.get("cwd") or os.getcwd())  # a notebook in /tmp/tmpX: its writes are its own
            ignore = [p for p in _NOT_USER_FILES if not cwd.startswith(os.path.abspath(p))] + [task["home"]]
            with WriteWatch(ignore=ignore) as watch:
                exec(compile(tree, filename, "exec"), ns)
        except _ReplayDone:
            pass
        except FlorError:  # ours (a damaged checkpoint, ...): already says what to do
            raise
        except Exception as e:
            where = f" in epoch {rep.epoch}" + (f", step {rep.last_step}" if rep.last_step is not None else "")
            raise ReplayError(f"The replayed code raised {type(e).__name__}: {e}{where if rep.epoch is not None else ''}.",
                              _user_traceback()) from None
    finally:
        runtime.deactivate(previous)
        if saved_main is not None:
            sys.modules["__main__"] = saved_main
        freshness.remember(began_ns)
    if rep._cuda_rng_pending and not rep._cuda_rng_checked:
        rep.lost_cuda_rng()  # never checked: whether the recording drew from them is unknown
    rows = []
    for name, epoch, step, seq, value in rep.rows:
        if isinstance(value, np.ndarray) and task.get("arrays") == "return":  # a remote worker: the client stores it
            rows.append((name, epoch, step, seq, value))
            continue
        if isinstance(value, np.ndarray):
            value = save_array(Path(task["home"]) / "artifacts" / f"{task['run_id']}-h", Path(task["home"]),
                               name, epoch, step, seq, value)
        rows.append((name, epoch, step, seq, runtime.encode(value)))
    return {
        "rows": rows,
        "divergence": rep.divergence,
        "checks": rep.checks,
        "setup_output": rep.setup_output[-20000:],
        "writes": sorted(watch.files),
        "removed": sorted(watch.removed),
        "rebuilt_differs": rebuilt,
        "probe_changed": {"start": rep.first, "names": kept.changed()} if kept else None,
        "tail_ran": rep.in_tail,
        "head_ran": rep.head_ran,
        "head_checked": rep.head_checked,
        "head_differs": rep.head_differs,
        "roots": list(rep.capturer.order) if rep.capturer else [],
        "advanced": sorted(rep.capturer.advanced) if rep.capturer else [],
        "problems": rep.problems,
        "devices": rep.devices,
        "segment": task["segment"],
        "setup_seconds": setup_seconds,
        "restore_seconds": rep.restore_seconds,
        "epoch_seconds": rep.epoch_seconds,
        "modes": {k: rep.modes[k] for k in rep.keep},
        "pid": os.getpid(),
    }


def _user_traceback() -> str:
    """The traceback without flor_nb's own frames."""
    etype, value, tb = sys.exc_info()
    frames = [f for f in traceback.extract_tb(tb) if "flor_nb" not in f.filename.replace("\\", "/").split("/")[-2:-1]]
    lines = traceback.format_list(frames) + traceback.format_exception_only(etype, value)
    return "Traceback (most recent call last):\n" + "".join(lines)
