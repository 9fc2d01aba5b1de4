"""Devices: the GPU state a run depends on, the settings that make GPU training replayable, device maps.

What this module holds, and who calls it:

- :func:`flags` / :func:`apply_flags`: the determinism and TF32 settings (cuDNN, deterministic
  algorithms, TF32 precision, ``CUBLAS_WORKSPACE_CONFIG``). Snapshots store them (stream ``devflags``);
  replay workers reapply the recorded ones before the cells run and at every restore.
- :func:`cuda_rng_states` / :func:`set_cuda_rng_states`: the generator of every CUDA device (stream
  ``rng/cuda``), captured only once CUDA is initialized (reading it must not start CUDA).
- :func:`deterministic` (``flor.deterministic()``): one call that sets what bit-exact GPU replay needs.
- :class:`DeviceMap`: where recorded tensors go on restore (``map_location`` style, ``device="cpu"``).
- :func:`staging`: how a snapshot copies a tensor off its device (the pool in state.py does the copy).
- :func:`tolerance_reasons`: why a replay must compare values with a tolerance (another device, or a
  recording made with non-deterministic GPU settings); the verdict says so and never blames a probe.

Multi-GPU training is not handled (one process, any number of devices is fine, but no
``torch.distributed``); nothing here assumes device 0.
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings

import torch

from .errors import FlorError

__all__ = ["deterministic", "flags", "apply_flags", "DeviceMap", "cuda_rng_states", "set_cuda_rng_states",
           "staging", "tolerance_reasons", "environment", "DeviceError"]

CUBLAS = "CUBLAS_WORKSPACE_CONFIG"
# Precision knobs of torch >= 2.9 (the "new API"); torch refuses to read the legacy allow_tf32 flags
# once these were set differently, so both are read defensively and the new ones win when present.
_PRECISION = (("fp32_precision", "backends"), ("cuda.matmul.fp32_precision", "backends"),
              ("cudnn.fp32_precision", "backends"), ("cudnn.conv.fp32_precision", "backends"),
              ("cudnn.rnn.fp32_precision", "backends"))


class DeviceError(FlorError):
    """A device a replay was asked for (or that the recording used) is not available here."""


# -- flags -------------------------------------------------------------------------------------------
def _get(dotted: str):
    obj = torch.backends
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set(dotted: str, value):
    head, _, last = dotted.rpartition(".")
    setattr(_get(head) if head else torch.backends, last, value)


def _read(fn):
    try:
        return fn()
    except (AttributeError, RuntimeError):
        return None


def flags() -> dict:
    """The settings GPU results depend on, as plain values (``None``: not readable in this torch)."""
    with warnings.catch_warnings():  # torch warns that the legacy TF32 flags are deprecated
        warnings.simplefilter("ignore")
        return _flags()


def _flags() -> dict:
    out = {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "matmul_allow_tf32": _read(lambda: bool(torch.backends.cuda.matmul.allow_tf32)),
        "cudnn_allow_tf32": _read(lambda: bool(torch.backends.cudnn.allow_tf32)),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cublas_workspace_config": os.environ.get(CUBLAS),
    }
    for name, _ in _PRECISION:
        value = _read(lambda name=name: _get(name))
        if value is not None:
            out[name] = value
    return out


def apply_flags(recorded: dict | None, env: bool = True) -> list[str]:
    """Set the recorded settings here; returns what could not be set (said in the verdict).

    ``env``: also set ``CUBLAS_WORKSPACE_CONFIG`` (only takes effect before CUDA starts: the replay
    worker calls this before the recorded cells run).
    """
    if not recorded:
        return []
    failed = []

    def attempt(what, fn):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()
        except (AttributeError, RuntimeError, ValueError) as e:
            failed.append(f"{what} ({type(e).__name__}: {e})"[:200])

    if "deterministic_algorithms" in recorded:
        attempt("torch.use_deterministic_algorithms", lambda: torch.use_deterministic_algorithms(
            bool(recorded["deterministic_algorithms"]), warn_only=bool(recorded.get("deterministic_warn_only"))))
    if "cudnn_deterministic" in recorded:
        torch.backends.cudnn.deterministic = bool(recorded["cudnn_deterministic"])
    if "cudnn_benchmark" in recorded:
        torch.backends.cudnn.benchmark = bool(recorded["cudnn_benchmark"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new_api = [n for n, _ in _PRECISION if recorded.get(n) is not None and _read(lambda n=n: _get(n)) is not None]
    if new_api:  # never mix the legacy and new TF32 APIs: torch refuses to read flags set both ways
        for name in new_api:
            attempt(f"torch.backends.{name}", lambda name=name: _set(name, recorded[name]))
    else:
        for key, target in (("matmul_allow_tf32", torch.backends.cuda.matmul),
                            ("cudnn_allow_tf32", torch.backends.cudnn)):
            if recorded.get(key) is not None:
                attempt(f"{key}", lambda target=target, key=key: setattr(target, "allow_tf32", recorded[key]))
    if recorded.get("float32_matmul_precision") and not new_api:
        attempt("torch.set_float32_matmul_precision",
                lambda: torch.set_float32_matmul_precision(recorded["float32_matmul_precision"]))
    if env:
        if recorded.get("cublas_workspace_config"):
            os.environ[CUBLAS] = recorded["cublas_workspace_config"]
        else:
            os.environ.pop(CUBLAS, None)
    return failed


def deterministic(warn_only: bool = False) -> dict:
    """Set what a run needs so that its GPU epochs replay bit-exactly; returns the settings before.

    Call it at the top of the notebook, before the first CUDA operation (``CUBLAS_WORKSPACE_CONFIG``
    is read when cuBLAS starts). It sets ``torch.use_deterministic_algorithms(True)`` (an op with no
    deterministic kernel then raises; ``warn_only=True``: warns), ``cudnn.deterministic = True``,
    ``cudnn.benchmark = False``, ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` and turns TF32 off (full fp32
    matmuls and convolutions). Cost: slower GPU training; +32% for bench/gpu.py's CNN with fp16 autocast
    on an H100 (more where fp32 matmuls would otherwise use TF32). Replay reapplies what the recording
    used, so record with these on to replay exactly.
    """
    before = flags()
    if CUBLAS not in os.environ:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            warnings.warn("flor_nb: CUDA already started: CUBLAS_WORKSPACE_CONFIG=:4096:8 takes effect only for "
                          "processes that set it before the first CUDA operation (recent torch no longer needs "
                          "it). Call flor.deterministic() first thing in the notebook.", stacklevel=2)
        os.environ[CUBLAS] = ":4096:8"
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if _read(lambda: _get("cuda.matmul.fp32_precision")) is not None:
            for name, _ in _PRECISION[1:]:  # the global one reads "none" (unset): leave it
                with contextlib.suppress(AttributeError, RuntimeError, ValueError):
                    _set(name, "ieee")
        else:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    return before


def nondeterministic(recorded: dict | None) -> list[str]:
    """Why GPU results under ``recorded`` settings can differ run to run (empty: deterministic)."""
    if not recorded:
        return ["the recording did not save its determinism settings"]
    out = []
    if not recorded.get("deterministic_algorithms"):
        out.append("recorded without torch.use_deterministic_algorithms(True) (atomic-add kernels such as "
                   "index_add, scatter_add and some backward passes sum in a different order each run)")
    elif recorded.get("deterministic_warn_only"):
        out.append("recorded with use_deterministic_algorithms(warn_only=True) (non-deterministic ops still ran)")
    if recorded.get("cudnn_benchmark"):
        out.append("recorded with torch.backends.cudnn.benchmark=True (cuDNN picks kernels by timing)")
    elif not recorded.get("cudnn_deterministic") and not recorded.get("deterministic_algorithms"):
        out.append("recorded with torch.backends.cudnn.deterministic=False")
    return out


# -- RNG ---------------------------------------------------------------------------------------------
def cuda_rng_states() -> list | None:
    """The generator state of every CUDA device, or None where CUDA has not started (nothing drew from it).

    Reading states must not start CUDA: a CPU-only run in a machine with a GPU stays CPU-only.
    """
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.get_rng_state_all()


def set_cuda_rng_states(states, device_map: DeviceMap | None = None) -> list[str]:
    """Put back recorded CUDA generator states, device ``cuda:i`` to where the map sends it.

    Returns what could not be put back: a CUDA generator mapped to the CPU has no counterpart (CUDA
    draws with Philox, the CPU with a Mersenne Twister), so random numbers drawn there differ.
    """
    if not states:
        return []
    lost = []
    for i, state in enumerate(states):
        target = (device_map or DeviceMap()).device(f"cuda:{i}")
        if target.type != "cuda" or not torch.cuda.is_available() or (target.index or 0) >= torch.cuda.device_count():
            lost.append(f"cuda:{i}")  # a recorded device this machine lacks: only a problem if it was drawn from
            continue
        torch.cuda.set_rng_state(state, target)
    return lost


# -- where tensors go --------------------------------------------------------------------------------
_DEVICE_RE = re.compile(r"^(cpu|cuda|mps|xpu|meta)(:\d+)?$")


class DeviceMap:
    """Where a recorded tensor goes on restore, ``map_location`` style.

    ``spec``: None (each tensor back on the device it was recorded on), one device for all
    (``"cpu"``, ``"cuda:1"``) or a dict from recorded device to device (``{"cuda:1": "cuda:0"}``,
    ``{"cuda": "cpu"}``: every CUDA device).
    """

    def __init__(self, spec=None):
        self.spec = spec
        if spec is None:
            self._one, self._map = None, {}
        elif isinstance(spec, (str, torch.device)):
            self._one, self._map = _parse(spec), {}
        elif isinstance(spec, dict):
            self._one, self._map = None, {str(_parse(k)) if ":" in str(k) else str(k): _parse(v)
                                          for k, v in spec.items()}
        else:
            raise DeviceError(f"device={spec!r} is not a device: give 'cpu', 'cuda:1' or a dict such as "
                              "{'cuda:0': 'cpu'}.")

    def __bool__(self):
        return self.spec is not None

    def device(self, recorded) -> torch.device:
        """The device a tensor recorded on ``recorded`` goes to."""
        recorded = torch.device(recorded) if not isinstance(recorded, torch.device) else recorded
        if self._one is not None:
            return self._one
        key = str(recorded)
        if key in self._map:
            return self._map[key]
        if recorded.type in self._map:
            return self._map[recorded.type]
        return recorded

    def crosses(self, recorded_devices) -> list[tuple[str, str]]:
        """(recorded, target) pairs of another device type: values computed there differ in the last bits."""
        out = []
        for d in sorted(set(recorded_devices)):
            target = self.device(d)
            if target.type != torch.device(d).type:
                out.append((d, str(target)))
        return out

    def targets(self) -> list[torch.device]:
        """The devices the map names explicitly."""
        return ([self._one] if self._one is not None else []) + list(self._map.values())

    def to_json(self):
        if self.spec is None or isinstance(self.spec, (str, torch.device)):
            return None if self.spec is None else str(self.spec)
        return {str(k): str(v) for k, v in self.spec.items()}


def _parse(spec) -> torch.device:
    text = str(spec)
    if not _DEVICE_RE.match(text):
        raise DeviceError(f"{spec!r} is not a device: give 'cpu', 'cuda' or 'cuda:N'.")
    return torch.device(text)


def check_available(target: DeviceMap, recorded_devices=()) -> None:
    """Refuse a replay whose tensors would land on a device this machine lacks, with the way out."""
    wanted = [(d, target.device(d)) for d in sorted(set(recorded_devices) | {"cpu"})]
    wanted += [(str(t), t) for t in target.targets()]
    for d, dev in wanted:
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise DeviceError(f"The replay would put tensors recorded on {d} on {dev}, and this machine has no "
                                  "CUDA GPU. Replay on the CPU with device='cpu' (%%flor replay ... --device cpu).")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise DeviceError(f"The replay would put tensors recorded on {d} on {dev}; this machine has "
                                  f"{torch.cuda.device_count()} CUDA device(s). Map it, e.g. "
                                  f"device={{'{d}': 'cuda:0'}}.")


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` (the current device) and ``cuda:0`` are taken as the same; ``cuda:0`` and ``cuda:1`` are not."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def move(value: torch.Tensor, device) -> torch.Tensor:
    """``value`` on ``device`` (a copy whenever it moves)."""
    if value.device == torch.device(device):
        return value
    return value.to(device)


def device_of(t: torch.Tensor) -> str:
    return str(t.device)


def tree_devices(tree) -> str | list | None:
    """The devices of a tree's tensors: one string when they share one (almost always), else the sorted
    distinct ones; None for a tree without tensors."""
    found = []
    stack = [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            found.append(x.device)
        elif isinstance(x, dict):
            stack.extend(reversed(list(x.values())))
        elif isinstance(x, (list, tuple)):
            stack.extend(reversed(x))
    if not found:
        return None
    first = found[0]
    if all(d == first for d in found):
        return str(first)
    return sorted({str(d) for d in found})  # an optimizer's state: moments on the GPU, Adam's `step` on the CPU


# -- snapshots ---------------------------------------------------------------------------------------
def staging(t: torch.Tensor, pinned_ok: bool = True) -> str:
    """How a snapshot copies ``t``: ``"pool"`` (a reused CPU buffer, ``copy_``), ``"pinned"`` (a reused
    pinned host buffer, non-blocking copy on a side stream), ``"host"`` (a fresh CPU copy, e.g. MPS or a
    sparse CUDA tensor) or ``"clone"`` (on its own device: meta tensors, quantized CPU tensors). Never a
    full copy on the GPU: GPU memory stays bounded while a snapshot waits to be written."""
    dev = t.device.type
    plain = t.layout == torch.strided and not t.is_quantized
    if dev == "cpu":
        return "pool" if plain else "clone"
    if dev == "meta":
        return "clone"
    if dev == "cuda" and plain and pinned_ok:
        return "pinned"
    return "host"


def uncaptured(placed: dict) -> dict:
    """{what: why} for device state a snapshot does not hold: generators of devices other than CPU and CUDA."""
    kinds = set()
    for where in placed.values():
        for d in [where] if isinstance(where, str) else where:
            kinds.add(torch.device(d).type)
    return {f"<{k} RNG>": (f"the random generator of {k} devices is not captured (flor_nb captures the CPU and CUDA "
                           f"ones): random draws on {k} differ in replay")
            for k in sorted(kinds - {"cpu", "cuda", "meta"})}


def on_cuda(placed: dict) -> bool:
    """Whether a snapshot's ``devices`` (path -> device, or a list of devices) put anything on CUDA."""
    return any(d.startswith("cuda") for w in placed.values() for d in ([w] if isinstance(w, str) else w))


def recording_note(placed: dict, recorded_flags: dict) -> str | None:
    """What to tell the user once when a run trains on CUDA with settings that rule out exact replay."""
    reasons = nondeterministic(recorded_flags) if on_cuda(placed) else []
    if not reasons:
        return None
    short = "; ".join(r.split(" (")[0].removeprefix("recorded ") for r in reasons)
    return (f"flor_nb: this run trains on CUDA with non-deterministic settings ({short}): its replays will compare "
            "values with a tolerance, not bit for bit. Call flor.deterministic() before the first CUDA operation "
            "and record again for exact replay.")


# -- verdict -----------------------------------------------------------------------------------------
def tolerance_reasons(recorded_devices, recorded_flags: dict | None, device_map: DeviceMap | dict | str | None,
                      lost_rng=(), recorded_gpus=(), gpus_here=()) -> list[str]:
    """Why a replay's values can only be compared with a tolerance; empty: they must be bit-exact.

    ``recorded_gpus`` / ``gpus_here``: the names of the CUDA devices, by index, where the run was
    recorded and here (deterministic kernels still differ between GPU models).
    """
    dm = device_map if isinstance(device_map, DeviceMap) else DeviceMap(device_map)
    reasons = []
    crossed = dm.crosses(recorded_devices)
    if crossed:
        pairs = ", ".join(f"{a} -> {b}" for a, b in crossed)
        reasons.append(f"replayed on another device than recorded ({pairs}), whose kernels round differently")
    if any(str(d).startswith("cuda") for d in recorded_devices) and not crossed:
        reasons.extend(nondeterministic(recorded_flags))
        models = []
        for d in sorted(d for d in set(recorded_devices) if str(d).startswith("cuda")):
            i, j = torch.device(d).index or 0, dm.device(d).index or 0
            if i < len(recorded_gpus) and j < len(gpus_here) and recorded_gpus[i] != gpus_here[j]:
                models.append(f"{d}: {recorded_gpus[i]} -> cuda:{j}: {gpus_here[j]}")
        if models:
            reasons.append(f"replayed on another GPU model ({'; '.join(models)}), whose kernels round differently")
    if lost_rng:
        reasons.append(f"random numbers drawn on {', '.join(lost_rng)} in the recording are drawn by another "
                       "generator here (CUDA and CPU generators differ), so dropout masks and other draws differ")
    return reasons


def environment() -> dict:
    """The GPU side of a run's environment (kept in ``run.env["gpu"]``)."""
    env = {"cuda_available": torch.cuda.is_available(), "flags": flags(),
           "cuda_version": torch.version.cuda, "cudnn_version": None, "devices": []}
    if torch.cuda.is_available():
        with contextlib.suppress(Exception):
            env["cudnn_version"] = torch.backends.cudnn.version()
            env["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env


# -- replay workers ----------------------------------------------------------------------------------
_CUDA_NAME = re.compile(r"^cuda(:\d+)?$")


@contextlib.contextmanager
def replay_context(device_spec, recorded_flags: dict | None):
    """Inside a replay worker, around the rebuilt cells and the replayed code.

    Sets the recorded determinism settings (``CUBLAS_WORKSPACE_CONFIG`` too: before the cells start
    CUDA, in a fresh worker) and, with ``device="cpu"``, makes ``torch.cuda.is_available()`` answer
    False so the usual ``device = "cuda" if torch.cuda.is_available() else "cpu"`` builds the model
    on the CPU. Yields the settings that could not be set.
    """
    failed = apply_flags(recorded_flags)
    dm = DeviceMap(device_spec)
    hide = dm and dm.device("cuda:0").type == "cpu" and dm.device("cuda").type == "cpu"
    saved = torch.cuda.is_available
    if hide:
        torch.cuda.is_available = lambda: False
    try:
        yield failed
    finally:
        torch.cuda.is_available = saved


def map_device_values(ns: dict, names, device_map: DeviceMap, used=()) -> list[str]:
    """Variables that name a device the recording's tensors lived on (``device = torch.device("cuda:1")`` or
    ``"cuda"``), restored from the recording, pointed where the map sends that device; returns
    ``name: old -> new`` for the verdict. ``used``: the recorded devices (a CPU run's ``"cuda"`` string
    named no device it used, and stays)."""
    if not device_map:
        return []
    used = [torch.device(u) for u in used]
    changed = []
    for name in names:
        value = ns.get(name)
        if isinstance(value, torch.device) or (isinstance(value, str) and _CUDA_NAME.match(value)):
            if not any(same_device(torch.device(value), u) for u in used):
                continue
            new = device_map.device(value)
            if str(new) != str(value):
                ns[name] = new if isinstance(value, torch.device) else str(new)
                changed.append(f"{name}: {value} -> {new}")
    return changed


def misplaced(ns: dict, names, device_map: DeviceMap) -> list[str]:
    """Modules still on a device the map moves away from (the cells put them there explicitly)."""
    if not device_map:
        return []
    out = []
    for name in names:
        value = ns.get(name)
        if isinstance(value, torch.nn.Module):
            p = next(value.parameters(), None)
            if p is not None and not same_device(device_map.device(p.device), p.device):
                out.append(f"{name} is on {p.device} although the replay maps it to {device_map.device(p.device)}: "
                           "a cell moved it there explicitly (write device = 'cuda' if torch.cuda.is_available() "
                           "else 'cpu')")
    return out
