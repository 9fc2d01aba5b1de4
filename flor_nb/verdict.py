"""Did a replay reproduce the recording? Compare, diagnose, and say what was and was not checked.

Two checks: every recorded metric of the replayed epochs, recomputed, equals
its recorded value exactly; and after each replayed epoch (and at its step
loop's exit) every captured stream (RNGs, models, optimizers, variables, ...)
has the recorded digest. The verdict says what it compared, names the first
stream that diverged and in which epoch, matches the diagnosis to the cause,
and lists what it could not check (values from the clock, objects that were
not captured but that the replayed code reads).
"""
from __future__ import annotations

import difflib
import re
from collections import defaultdict

from . import runtime
from .paths import root

FAITHFUL, CAVEATS, NOT_FAITHFUL = "faithful", "caveats", "not faithful"


# Tolerance where values cannot be bit-exact (another device, non-deterministic GPU kernels): |a - b| <=
# ATOL + RTOL * |a|. Loose enough for fp32 rounding carried through an epoch of training, tight enough
# that a changed learning rate or a skipped batch shows.
RTOL, ATOL = 1e-3, 1e-5

# A probe line that may draw from a global RNG when it calls one of these directly.
_DRAWS = re.compile(r"\b(random|rand|randn|randint|randperm|rand_like|randn_like|shuffle|sample|choices?|"
                    r"permutation|normal_?|uniform_?|bernoulli_?|multinomial|dropout|Dropout|manual_seed|seed|integers)\b")
_GLOBAL_RNG = ("rng/random", "rng/numpy", "rng/torch")


def compare_metrics(recorded, rows, modes: dict, clock_metrics=(), tolerance=None, outside=False) -> dict:
    """Per recorded metric: how many values were compared, exact, missing; the first mismatch.

    ``tolerance``: ``(rtol, atol)``; values that differ within it count as ``close``, and a metric whose
    values are all exact or close has the verdict ``close`` (never ``exact``). ``outside``: the cell's lines before
    or after its loop ran, so what the recording logged there (no epoch) under the names they logged is compared
    too.
    """
    got_outside = {n for n, e, *_ in rows if e is None}  # before or after the loop: both are epoch None
    want = {(r["name"], r["epoch"], r["step"], r["seq"]): runtime.from_json(r["value"])
            for r in recorded if (r["epoch"] in modes and (r["step"] is None or modes[r["epoch"]] == "full"))
            or (outside and r["epoch"] is None and r["name"] in got_outside)}
    got = {(n, e, s, q): runtime.from_json(v) for n, e, s, q, v in rows}
    by_name = defaultdict(list)
    for key in want:
        by_name[key[0]].append(key)
    metrics = {}
    for name, keys in sorted(by_name.items()):
        if name in clock_metrics:
            metrics[name] = {"compared": 0, "exact": 0, "missing": 0, "max_abs_diff": 0.0, "verdict": "clock",
                             "first_mismatch": None}
            continue
        n_exact, n_close, missing, max_diff, first_bad = 0, 0, 0, 0.0, None
        for key in keys:
            if key not in got:
                missing += 1
                continue
            a, b = want[key], got[key]
            if runtime.same(a, b):
                n_exact += 1
            else:
                d = runtime.abs_diff(a, b)
                max_diff = max(max_diff, d if d is not None else float("inf"))
                if tolerance is not None and d is not None and d <= tolerance[1] + tolerance[0] * abs(float(a)):
                    n_close += 1
                elif first_bad is None:
                    first_bad = {"epoch": key[1], "step": key[2], "recorded": a, "replayed": b}
        verdict = ("exact" if n_exact == len(keys) else "missing" if missing == len(keys)
                   else "close" if n_exact + n_close == len(keys) else "diverged")
        metrics[name] = {"compared": len(keys) - missing, "exact": n_exact, "missing": missing,
                         "max_abs_diff": max_diff, "verdict": verdict, "first_mismatch": first_bad}
        if tolerance is not None:
            metrics[name]["close"] = n_close
    return metrics


def changed_lines(recorded: str, edited: str) -> list[int]:
    """Line numbers of the recorded code that the edit changed or removed (insertions are probes)."""
    sm = difflib.SequenceMatcher(a=recorded.splitlines(), b=edited.splitlines(), autojunk=False)
    out = []
    for op, i1, i2, _, _ in sm.get_opcodes():
        if op in ("replace", "delete"):
            out.extend(range(i1 + 1, i2 + 1))
    return out


def _stream_words(keys) -> str:
    """``grad/model``, ``val/inputs`` -> "the gradients of model, inputs"."""
    out = []
    for k in keys:
        kind, _, path = k.partition("/")
        out.append(f"the gradients of {path}" if kind == "grad" else f"the gradient of {path}" if kind == "valgrad"
                   else path)
    out = list(dict.fromkeys(out))  # a variable is named once
    return ", ".join(out)


def check(recorded, rows, modes: dict, results, *, recorded_code="", code="", edited_cells=None,
          run_state=None, reads=(), outside=False) -> dict:
    """The fidelity of a replay, as a JSON-able dict (see the module docstring)."""
    run_state = run_state or {}
    clock_vars, clock_metrics = set(run_state.get("clock_vars", ())), set(run_state.get("clock_metrics", ()))
    tol = tolerance_mode(results)
    metrics = compare_metrics(recorded, rows, modes, clock_metrics, (RTOL, ATOL) if tol else None, outside)
    events, checks, problems = [], [], []
    for res in results:
        events.extend(res.get("divergence", []))
        checks.extend(res.get("checks", []))
        problems.extend(res.get("problems", []))
    expected = []  # tolerance mode: bit-level state digests are expected to differ, so they judge nothing
    if tol:
        expected, events = [e for e in events if e["differ"] or e["missing"]], []
    events.sort(key=lambda d: (d["epoch"], d["where"] != "step"))
    streams = {s for c in checks for s in c["streams"]}
    checked_epochs = sorted({c["epoch"] for c in checks if c["where"] == "end"})
    # A kept unit is covered when its segment checked the state at or after it: a change a probe made
    # there would still show (an iteration loop is checked every few hundred iterations, not each one).
    covered = set()
    for res in results:
        ends = [c["epoch"] for c in res.get("checks", []) if c["where"] == "end"]
        last = max(ends, default=None)
        covered |= {int(e) for e in res.get("modes", {}) if last is not None and int(e) <= last}
    diverged = [e for e in events if e["differ"] or e["missing"]]
    not_captured = run_state.get("not_captured") or {}
    read = {p: why for p, why in not_captured.items() if root(p) in set(reads)}
    metric_bad = [n for n, m in metrics.items() if m["verdict"] == "diverged"]
    faithful = not metric_bad and not diverged and not problems
    unchecked = set(modes) - covered
    rebuilt = {n: why for res in results for n, why in (res.get("rebuilt_differs") or {}).items()}  # setup_check
    probe_changed = _probe_changed(results)
    level = NOT_FAITHFUL if not faithful else (
        CAVEATS if read or rebuilt or unchecked or tol or probe_changed["names"] else FAITHFUL)
    draws = probes_draw(recorded_code, code, edited_cells)
    advanced = sorted({p for r in results for p in r.get("advanced", ())})
    cause = _cause(diverged, metric_bad, recorded_code, code, edited_cells, read, draws,
                   run_state.get("hash_cause"), advanced) if not faithful else None
    if tol:
        tol["state_differs"] = sorted({s for e in expected for s in e["differ"] + e["missing"]})
        tol["max_abs_diff"] = max((m["max_abs_diff"] for m in metrics.values()), default=0.0)
        if not faithful and not problems:  # the device, not a probe, is the known cause
            cause = (f"Values differ beyond the tolerance (rtol {RTOL:g}, atol {ATOL:g}); expected when "
                     + "; ".join(tol["reasons"]) + ". This replay cannot tell such drift from a change a probe "
                     "made: replay on the recorded device with the recorded settings (see flor.deterministic()) "
                     "to check exactly")
    return {
        "tolerance": tol,
        "probes_draw": draws,
        "faithful": faithful,
        "level": level,
        "metrics": metrics,
        "state": {"epochs": checked_epochs, "unchecked": sorted(unchecked),
                  "streams": len(streams), "diverged": diverged},
        "state_diverged": _by_epoch(diverged),
        "problems": problems,
        "not_compared": {"variables": sorted({k.partition("/")[2] for c in checks for k in c.get("not_compared", ())
                                              if k.startswith("var/") and k[4:] in clock_vars}),
                         "metrics": sorted(n for n, m in metrics.items() if m["verdict"] == "clock"),
                         **({"left_out": {"epochs": sorted({c["epoch"] for c in checks if c.get("left_out")}),
                                          "values": sorted({k for c in checks for k in c.get("left_out", ())
                                                            if k.partition("/")[0] in ("grad", "var", "valgrad")})}}
                            if any(c.get("left_out") for c in checks) else {}),
                         **({"attributes": [f"{', '.join(a)} of {t.rpartition('.')[2]} objects"
                                            for t, a in run_state["clock_attrs"].items()]}
                            if run_state.get("clock_attrs") else {})},
        "not_captured_read": read,
        "rebuilt_differs": rebuilt,
        "probe_changed": probe_changed,
        "cause": cause,
        "epochs": sorted(modes),
        "digest_errors": run_state.get("digest_errors") or [],
    }


def _probe_changed(results) -> dict:
    """What the probes changed from one unit to the next in segments starting past unit 0 (probe_state):
    {"names": {name: "changed"|"unwatched"|"partial"}, "starts": [first units of those segments], "epochs": [their
    units replayed for the user]}."""
    names, starts, epochs = {}, set(), set()
    for res in results:
        found = (res.get("probe_changed") or {}).get("names") or {}
        if found:
            starts.add(res["probe_changed"]["start"])
            epochs |= {int(e) for e in res.get("modes", {})}
        for name, how in found.items():
            names[name] = "changed" if "changed" in (how, names.get(name)) else how
    return {"names": names, "starts": sorted(starts), "epochs": sorted(epochs)}


def _by_epoch(events) -> dict:
    out: dict = {}
    for e in events:
        out.setdefault(e["epoch"], set()).update(e["differ"] + e["missing"])
    return {k: sorted(v) for k, v in out.items()}


# Streams that cause others to differ come first: a mode switch or a random draw changes the weights after it.
_CAUSES = ("devflags", "devices", "train/", "reqgrad/", "iters", "rng/", "npgen/", "nprs/", "groups/", "var/",
           "attrs/", "vmeta", "big")  # iters: an iterator remade at another point draws its seeds from the RNGs


def first_cause(event: dict, kinds: dict) -> str:
    """The stream of a divergence event most likely to be its cause."""
    streams = event["differ"] + event["missing"]

    def rank(s):
        if s.startswith("obj/") and kinds.get(s[4:]) == "torch_generator":
            return _CAUSES.index("rng/")
        return next((i for i, p in enumerate(_CAUSES) if s.startswith(p)), len(_CAUSES))
    return min(streams, key=lambda s: (rank(s), s))


def probes_draw(recorded_code: str, code: str, edited_cells=None) -> bool:
    """Whether a line the replay added or changed (or an edited cell) calls something that draws random numbers.
    Lines whose draws from the global generators the replay undid (probe_rng) are left out."""
    import ast

    from .edits import added_lines
    from .probe_rng import guard

    lines = code.splitlines() if code else []
    try:
        guarded = set(guard(ast.parse(code), recorded_code or "", code)) if code else set()
    except SyntaxError:
        guarded = set()
    added = [lines[i - 1] for i in added_lines(recorded_code or "", code) if i not in guarded] if code else []
    text = "\n".join(added + list((edited_cells or {}).values()))
    return bool(_DRAWS.search(text))


def _only_global_rng(diverged) -> list[str]:
    """The global RNG streams, when they are all that differ (else [])."""
    streams = {s for e in diverged for s in e["differ"] + e["missing"]}
    return sorted(streams) if streams and streams <= set(_GLOBAL_RNG) else []


def _cause(diverged, metric_bad, recorded_code, code, edited_cells, read, draws=True, hashes=None,
           advanced=()) -> str:
    changed = changed_lines(recorded_code, code) if recorded_code and code else []
    if changed:  # certain: the code that trained is not the code that replayed
        where = ", ".join(map(str, changed[:6])) + (" ..." if len(changed) > 6 else "")
        return (f"The replayed code changed or removed recorded line(s) {where}, so training no longer follows "
                "the recording. Replay the recorded code with probe lines added, not changed.")
    causes = []
    if read:
        names = ", ".join(list(read)[:4])
        causes.append(f"the replayed code reads {names}, which could not be captured (see below), so replay "
                      f"started from a rebuilt {'copy' if len(read) == 1 else 'copies'} instead of the recorded "
                      "state (what is said about it below says how to make it capturable)")
    if edited_cells:
        causes.append("an edited dependency cell changed training (keep edits to helpers to added flor.log lines)")
    foreign = _only_global_rng(diverged) if not draws and not metric_bad else []
    remade = any("iters" in e["differ"] for e in diverged)
    if remade:
        causes.append("a DataLoader iterator kept across units was made again during the recording (when its data "
                      "ran out), so the replay could not bring the one its cells rebuilt to the recorded position "
                      "and drew other batches; replay units from before it was first made again, or give the loader "
                      "a sampler that does not run out (RandomSampler(..., replacement=True, num_samples=...))")
    elif advanced:  # drawn forward to their position: right only if they start their order as they did
        causes.append(f"the DataLoader iterator {', '.join(advanced[:4])} was brought to its recorded position by "
                      "drawing its batches again, but the order it draws is fixed when it yields its first batch, "
                      "from a generator or RNG the replay could not put back as it was at that moment, so it "
                      "yielded other batches (make the iterator where you first draw from it, or give its "
                      "DataLoader a torch.Generator of its own)")
    if foreign and not remade:  # no probe line draws: a function a probe calls, or another thread, is as likely
        names = " and ".join(_RNG_NAMES[s] for s in foreign)
        causes.append(f"a function a probe calls drew from {names} (an evaluation helper that samples batches, "
                      "say; log values that need no random numbers, or compute them after training)")
        causes.append(f"another thread of the recording or the replaying process drew from {names} while it ran "
                      "(an in-process server, a Dask client, a background loader); record and replay with nothing "
                      "else running in the kernel")
    elif diverged and code != recorded_code and not remade:
        causes.append("a probe changed training (make probes read-only: wrap them in torch.no_grad(), switch back "
                      "any mode they change, e.g. model.train() after model.eval(), and put them on lines of their "
                      "own: draws from the global random generators in added lines are undone, not in a recorded "
                      "line you changed, nor from a generator the cells made)")
    if hashes:  # the code depends on string hashes, which this process computes otherwise (hash_seed.py)
        causes.append(hashes)
    if not causes:
        names = ", ".join(metric_bad) or "the state"
        causes.append(f"{names} differ although nothing was edited: something the recording did not capture, the "
                      "environment (library versions, thread count), or non-deterministic operations")
    if len(causes) == 1:
        return causes[0][0].upper() + causes[0][1:] + "."
    return "Possible causes: " + "; or ".join(f"({i}) {c}" for i, c in enumerate(causes, 1)) + "."


_RNG_NAMES = {"rng/torch": "torch's global RNG", "rng/numpy": "numpy's global RNG",
              "rng/random": "Python's random module", "rng/cuda": "the CUDA generators"}


def describe(event: dict, kinds: dict | None = None, draws: bool = True, unit: str = "epoch") -> str:
    """The divergence's likely cause, in words: what differs, where, and what usually causes it."""
    kinds = kinds or {}
    stream = first_cause(event, kinds)
    kind, _, path = stream.partition("/")
    epoch = event["epoch"]
    at = {"end": f"after {unit} {epoch}", "step": f"at the end of {unit} {epoch}'s step loop",
          "restore": f"when {unit} {epoch} was restored"}[event["where"]]
    missing = stream in event["missing"]
    rng = "the replayed code drew random numbers the recording did not"
    if kind == "rng":
        what = _RNG_NAMES.get(stream, path)
        if not draws and stream in _GLOBAL_RNG:
            return (f"{what} differs {at}, although no probe line draws random numbers itself (see the possible "
                    "causes)")
        return f"{what} differs {at}: {rng}"
    if stream == "devflags":
        return (f"the GPU determinism settings differ {at}: the replayed code changed them (cudnn.benchmark, "
                "use_deterministic_algorithms, TF32), or this torch could not set the recorded ones")
    if stream == "iters":
        return (f"the position of a DataLoader iterator kept across {unit}s differs {at}: the replay could not bring "
                "the one its cells rebuilt to the recording's (made again during the recording, or drawn from before "
                "the loop), so it drew other batches")
    if stream == "devices":
        return f"the devices of the tensors differ {at}: the replayed code moved a model or tensor to another device"
    if kind == "npgen":
        return f"numpy Generator {path} differs {at}: {rng} from it"
    if kind == "nprs":
        return f"numpy RandomState {path} differs {at}: {rng} from it"
    if kind in ("obj", "leaves"):
        k = kinds.get(path)
        if k == "torch_generator":
            return f"torch.Generator {path} differs {at}: {rng} from it"
        if k == "module":
            return f"the weights or buffers of {path} differ {at}: the replayed code changed the model"
        if k == "optimizer":
            return f"the state of optimizer {path} differs {at}"
        return f"the state of {path} differs {at}"
    if kind == "grad":
        return f"the gradients of {path} differ {at}"
    if kind == "train":
        return (f"the train/eval mode of {path} differs {at}: the replayed code switched it "
                "(model.eval() without model.train() after it?)")
    if kind == "reqgrad":
        return f"the requires_grad flags of {path} differ {at}"
    if kind == "groups":
        return f"the parameter groups of optimizer {path} differ {at}"
    if kind == "var":
        if missing:
            return f"variable {path} is not set {at} although the recording had it"
        return f"variable {path} differs {at}"
    if kind == "attrs":
        return f"attribute {path} {'is gone' if missing else 'differs'} {at}"
    if kind in ("val", "valgrad", "arr"):
        return f"{'the gradient of ' if kind == 'valgrad' else ''}{path} differs {at}"
    if kind == "big":
        return f"a value too large to store differs {at}"
    return f"{stream} differs {at}"


def tolerance_mode(results) -> dict | None:
    """When values must be compared with a tolerance: the reasons, from what the workers saw; else None."""
    from .devices import tolerance_reasons

    infos = [r["devices"] for r in results if r.get("devices")]
    if not infos:
        return None
    recorded = sorted({d for i in infos for d in i.get("recorded", [])})
    flags = next((i["flags"] for i in infos if i.get("flags")), None)
    device_map = infos[0].get("device_map")
    lost = sorted({d for i in infos for d in i.get("lost_rng", [])})
    reasons = tolerance_reasons(recorded, flags, device_map, lost, infos[0].get("recorded_gpus") or (),
                                infos[0].get("gpus_here") or ())
    if device_map and not recorded and any(i.get("recorded_cuda_available") and not i.get("restored") for i in infos):
        # no checkpoint was restored (a segment from the start): where the recording ran is unknown
        reasons.append(f"replayed with device={device_map!r} a run recorded on a machine with CUDA, without a "
                       "restored checkpoint to tell where its tensors lived")
    notes = sorted({n for i in infos for n in i.get("flag_problems", [])})
    if notes:
        reasons.append("recorded determinism settings could not be set here")
    if not reasons:
        return None
    return {"reasons": reasons, "rtol": RTOL, "atol": ATOL, "recorded_devices": recorded, "device_map": device_map,
            "flag_problems": notes, "mapped": sorted({m for i in infos for m in i.get("mapped", [])}),
            "misplaced": sorted({m for i in infos for m in i.get("misplaced", [])})}


# The words of a verdict live in verdict_words; verdict_text is kept here for callers of flor_nb.verdict.
from .verdict_words import verdict_text  # noqa: E402, F401
