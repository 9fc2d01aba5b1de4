"""Record a training cell: run it with logging and a checkpoint at every epoch boundary."""
from __future__ import annotations

import linecache
import logging
import multiprocessing
import os
import platform
import sys
import time
import traceback
import types
import warnings

import numpy as np
import torch

from . import (data_watch, devices, frameworks, hash_seed, objstore, runtime, saver, setup_check, state, thinning,
               validate)
from .cells import Cell, after_training, analyze, resolve
from .clock import clock_names
from .errors import FlorError, NoLoopError, NotCapturedWarning
from .kinds import CODE
from .edits import find_helper, helper_code, helper_reads_after_steps
from .instrument import RUNTIME, instrument
from .recorder import Recorder
from .run_close import spec_of
from .roots import root_names
from .store import Run, Store, get_store

from .thinning import Thinner

logger = logging.getLogger(__name__)


def environment() -> dict:
    """What the run ran on: enough to explain a replay that does not reproduce."""
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "start_method": multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_start_method(),
        "host": platform.node(),
        "gpu": devices.environment(),  # CUDA devices, versions, determinism settings at the start
        "hashseed": hash_seed.environment(),  # a replay in another process hashes strings alike only if set
    }
    for mod in ("pandas", "sklearn", "flor_nb"):
        m = sys.modules.get(mod)
        if m is not None:
            env[mod] = getattr(m, "__version__", "?")
    return env


def parse_state(spec: str | None) -> tuple[set | None, set]:
    """``--state a,b`` narrows to those names; ``--state +a,+b`` adds them to what is found."""
    if not spec:
        return None, set()
    names = [s.strip() for s in spec.split(",") if s.strip()]
    extra = {n[1:] for n in names if n.startswith("+")}
    only = {n for n in names if not n.startswith("+")}
    return (only or None), extra


def record(
    code: str,
    name: str = "run",
    namespace: dict | None = None,
    history: list[Cell] | None = None,
    cells: list[str] | None = None,
    state_spec: str | None = None,
    store: Store | str | None = None,
    progress=False,
    overhead: float = 0.02,
    blobs: str | None = None,
    max_store=None,
) -> Run:
    """Run ``code`` (a training cell) in ``namespace``, recording logs and checkpoints.

    Parameters
    ----------
    code : the cell's source; its epoch and step loops are found as README's "How loops are found" says.
    name : run name; recording a name again makes a new version.
    namespace : globals to run in (the notebook's user namespace); a fresh dict if None.
    history : executed cells (the extension tracks them); the ones ``code`` needs are kept, and
        the ``flor.arg`` values they (and ``code``) set are the run's args.
    cells : for scripts, the sources that rebuild the namespace on replay, in order; the run's
        args are those set since the previous record (and by ``code``).
    state_spec : ``"a,b"`` narrows the checkpointed names, ``"+a,+b"`` adds to them.
    progress : True for a tqdm bar over the units, or a front end's own bar (see :func:`bar_factory`).
    overhead : checkpoint time budget as a fraction of training time (every epoch while it fits;
        ``float("inf")``: every epoch, whatever it costs).
    blobs : where checkpoint files and blobs go: a folder (shared with replay workers) or an fsspec URL
        (``s3://bucket/prefix``); default ``$FLOR_NB_BLOBS``, else the store's folder. The index stays in the
        store. A URL given as ``store`` means the same (the index then stays in the default store folder).
    max_store : disk budget for the run's checkpoints, ``"2GB"`` or bytes; over it, older checkpoints are
        thinned (see thinning.py). None: a quarter of the free disk space, at most 20 GB; ``"inf"``: none.
    """
    __tracebackhide__ = True  # IPython shows the user's frames, not ours
    name, overhead = validate.run_name(name), validate.overhead(overhead)
    saver.mode()  # a bad FLOR_NB_SAVER fails here, before anything is recorded
    if objstore.is_url(store):  # --store s3://...: the blobs go there, the index stays with the notebook
        blobs, store = blobs or store, None
    blobs = objstore.location(blobs)
    if blobs:
        objstore.check(blobs)  # unreachable or not writable: fail now, not after training without checkpoints
    store = get_store(store)
    budget = thinning.budget_for(max_store, store.home)  # a bad size fails before anything runs
    ns = {"__name__": "__main__"} if namespace is None else namespace
    tree, loops = instrument(code, namespace=ns)
    since_last = runtime.IDLE.take_args()
    tainted = {}
    if history is not None:
        trainers = {n for n, v in list(ns.items()) if frameworks.framework_of(v)}
        deps, missing = resolve(history, code, trainers)
        _warn_unrebuildable(missing, ns, name)
        tainted = after_training(history, deps, trainers)
        args = {k: v for c in deps for k, v in c.args.items()}  # the run's args: its cells' (later cells win)
    else:
        deps = [Cell(i, src) for i, src in enumerate(cells or [], start=1)]
        args = since_last  # a script has no cells to tell them apart: the args set since the last record
    ns[RUNTIME] = sys.modules["flor_nb"]
    hashes = hash_seed.record_warning([("the recorded cell", code)] + [(f"In[{c.count}]", c.source) for c in deps])
    if hashes:
        warnings.warn(f"flor_nb: {hashes}", NotCapturedWarning, stacklevel=3)
    free, assigned = analyze(code)
    only, extra = parse_state(state_spec)
    unknown = sorted(n for n in (only or set()) | extra if n not in ns and n not in assigned)
    if unknown:
        raise FlorError(f"--state names {', '.join(unknown)}, which neither the namespace nor the cell defines. "
                        "Name variables that exist (--state a,b narrows what is saved, --state +a,+b adds).")
    # Values an earlier training changed, which a replay's re-run cells would compute from an untrained state.
    tainted = {n: c for n, c in tainted.items() if n in ns and n not in free | assigned and not isinstance(ns[n], CODE)}
    if only is None:
        extra = extra | set(tainted)
    scope = state.Scope(assigned=assigned, free=free, extra=extra, only=only)
    dep_cells = [c.to_dict() for c in deps]
    roots = root_names(ns, scope)[0]
    rebuilt = setup_check.record_digests(ns, dep_cells, roots)  # what a replay re-runs cells for
    choice = loops.choice()
    helper = find_helper(code, loops, [(c.count, c.source) for c in deps], ns)
    swapped = None
    if helper is not None:  # the step loop is in a function an earlier cell defined (train(dataloader, ...))
        fn = ns[helper["name"]]
        source = dict((c.count, c.source) for c in deps)[helper["cell"]]
        carried = helper_reads_after_steps(source, helper, code)
        if carried and carried != ["?"]:  # kept with the step loop's exit state, so a replay can still skip it
            helper["carry"] = carried
        try:
            swapped = (fn, fn.__code__, helper_code(source, helper, fn.__code__.co_filename))
            choice["helper"] = helper
        except (SyntaxError, NoLoopError, StopIteration, ValueError) as e:
            logger.info("flor_nb: %s() not instrumented: %s", helper["name"], e)
    # What a replay (or a resume) of a run killed before finish() needs is stored now, not at the end.
    run = store.create_run(name, code, deps=dep_cells, args=args,
                           env={**environment(), **({"blobs": blobs} if blobs else {})},
                           state={"loops": choice, "capture": 2, "spec": spec_of(scope),
                                  "after_training": {n: list(c) for n, c in sorted(tainted.items())},
                                  "setup_digests": rebuilt})
    try:
        bar = bar_factory(progress, run)
        # Checkpoints kept elsewhere (s3://, a shared folder) are not thinned: the budget is this disk's.
        thinner = None if blobs else Thinner(store, run, budget, max_store is None)
        recorder = Recorder(store, run, ns, scope, bar, overhead, thinner)
        recorder.data_watch = data_watch.Watch(ns, roots)
        recorder.notes.update(recorder.data_watch.notes())
        recorder.quiet_roots = set(tainted) - (only or set())
        if only is not None:
            _warn_left_out_after_training(recorder, {n: c for n, c in tainted.items() if n not in only}, name)
        recorder.clock = clock_names(code)
        recorder.base_args = args
        if not loops.framework:  # values the next unit recomputes need not be stored
            recorder.liveness_input = (code, choice, [c.source for c in deps])
    except BaseException as e:  # no run is left 'running' by a failure before training starts
        store.update_run(run.id, status="failed", ended=time.time(), error=f"{type(e).__name__}: {e}")
        raise
    return execute(recorder, tree, code, swapped)


def execute(recorder: Recorder, tree, code: str, swapped=None) -> Run:
    """Run an instrumented cell under ``recorder``; close the run however the cell ends.

    ``swapped``: (function, its code, instrumented code) for a step loop in a helper function."""
    __tracebackhide__ = True
    run, ns = recorder.run, recorder.ns
    filename = f"<flor record {run.label}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
    previous = runtime.activate(recorder)
    if swapped is not None:
        swapped[0].__code__ = swapped[2]
    try:
        exec(compile(tree, filename, "exec"), ns)
    except BaseException as e:
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        recorder.finish(status, "".join(traceback.format_exception_only(type(e), e)).strip())
        raise
    else:
        recorder.finish("finished")
    finally:
        runtime.deactivate(previous)
        if swapped is not None:
            swapped[0].__code__ = swapped[1]  # the user's function as it was
    return recorder.store.find_run(run.label)



def _warn_unrebuildable(missing, ns, name):
    """Objects the cell needs that no cell replay re-runs creates (made by a %%flor cell, say)."""
    kinds = (torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, types.FunctionType,
             type, torch.utils.data.DataLoader, torch.utils.data.Dataset)
    lost = sorted(n for n in missing if isinstance(ns.get(n), kinds))
    if lost:
        warnings.warn(f"flor_nb: replay of run {name!r} will not be able to rebuild {', '.join(lost)}: no earlier "
                      "cell that replay re-runs creates it (a %%flor cell or code outside the notebook did). "
                      "Create it in a cell of its own, run that cell, and record again.", stacklevel=3)


def _warn_left_out_after_training(recorder, tainted: dict, name):
    """``--state a,b`` left out names a replay would compute from an untrained state: say so now, and in the
    verdict of a replay that reads them."""
    why = {n: f"computed by In[{c}] after the training in In[{t}], which replay does not run again; left out by "
              "--state" for n, (c, t) in tainted.items()}
    if why:
        recorder.not_captured.update(why)
        listed = "; ".join(f"{n}: {w}" for n, w in why.items())
        warnings.warn(f"flor_nb: not captured in run {name!r}: {listed}. A replay rebuilds "
                      f"{'it' if len(why) == 1 else 'them'} from the model before that training. Add "
                      f"--state +{',+'.join(why)} to keep {'it' if len(why) == 1 else 'them'}.",
                      NotCapturedWarning, stacklevel=4)


def bar_factory(progress, run):
    """``progress``: false (no bar), True (a tqdm bar), or a callable ``(label, total, unit)`` returning a bar (a
    front end's own, with tqdm's ``update``, ``set_postfix`` and ``close``). Returns what the recorder calls with
    the unit count once it is known. ``unit`` is "iteration" for a loop of iterations, else "epoch"."""
    unit = "iteration" if (run.state.get("loops") or {}).get("unit") == "iterations" else "epoch"
    if callable(progress):
        return lambda total: progress(run.label, total, unit)
    return (lambda total: _progress_bar(run, total, unit)) if progress else None


def _progress_bar(run, total, unit="epoch"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=run.label, unit=unit, leave=True, dynamic_ncols=True)
