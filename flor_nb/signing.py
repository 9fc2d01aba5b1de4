"""Only run what you trust: a per-user secret signs what replay executes or unpickles.

Replay re-runs a run's recorded cells and unpickles its checkpointed Python
state, so a store someone else wrote could run any program as you. Everything
flor_nb writes that a replay or a resume executes or unpickles is signed with
HMAC-SHA256 under a key kept outside the store (``$XDG_CONFIG_HOME/flor_nb/key``,
by default ``~/.config/flor_nb/key``, created on first use, readable by you
only): each run's recorded cells, each checkpoint file, and the pickled blobs a
checkpoint names. Replay refuses what does not verify; :func:`flor_nb.housekeeping.trust` re-signs a
store whose origin you vouch for. Signatures do not depend on where the store
lies, so a store you move or copy keeps working.
"""
from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import secrets
from pathlib import Path

from .errors import FlorError, UntrustedStoreError

logger = logging.getLogger(__name__)

KEY_BYTES = 32
_keys: dict = {}


_chosen: Path | None = None  # a replay worker uses the key its kernel names (see use_key)


def key_path() -> Path:
    """Where this user's signing key lives (outside every store)."""
    if _chosen is not None:
        return _chosen
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "flor_nb" / "key"


def use_key(path) -> None:
    """Verify with the key at ``path``: a warm worker's environment may predate its kernel's."""
    global _chosen
    _chosen = Path(path)


def key() -> bytes:
    """This user's signing key, created (0600, in a 0700 folder) the first time it is needed."""
    path = key_path()
    cached = _keys.get(str(path))
    if cached is not None:
        return cached
    try:
        secret = path.read_bytes()
    except FileNotFoundError:
        secret = _create(path)
    except OSError as e:
        raise FlorError(f"Cannot read the flor_nb signing key {path}: {e.strerror}. Make it readable by you, or "
                        "point XDG_CONFIG_HOME at a folder you own.") from e
    if len(secret) < 16:
        raise FlorError(f"The flor_nb signing key {path} holds {len(secret)} bytes; a key needs at least 16. "
                        "Delete it (a new one is made on the next record) and run flor.trust(store) on your stores.")
    _keys[str(path)] = secret
    return secret


def _create(path: Path) -> bytes:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".key.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as f:
        f.write(secrets.token_bytes(KEY_BYTES))
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # atomic and exclusive: a process that got there first keeps its key
    except FileExistsError:
        pass
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    logger.info("flor_nb: created the signing key %s", path)
    return path.read_bytes()


def mac(data, context: str = "") -> bytes:
    """HMAC-SHA256 of ``data`` bound to ``context`` (what the bytes are, e.g. a checkpoint's path)."""
    h = hmac.new(key(), context.encode("utf-8", "surrogatepass") + b"\0", "sha256")
    h.update(data)
    return h.digest()


def verify(data, tag: bytes, context: str = "") -> bool:
    """Whether ``tag`` is :func:`mac` of ``data``, or its first 16 bytes or more (blob tags are truncated)."""
    tag = bytes(tag)
    return len(tag) >= 16 and hmac.compare_digest(mac(data, context)[:len(tag)], tag)


# -- runs -----------------------------------------------------------------------------------
def _run_payload(name: str, version: int, code: str, deps: list) -> bytes:
    cells = [[c.get("count"), c.get("source")] for c in deps]
    return json.dumps({"run": f"{name}@{version}", "code": code, "deps": cells}, sort_keys=True).encode()


def sign_run(name: str, version: int, code: str, deps: list) -> str:
    """The signature of a run's recorded cells (the training cell and its dependency cells)."""
    return mac(_run_payload(name, version, code, deps), "run").hex()


def run_verifies(run) -> bool:
    sig = getattr(run, "sig", None)
    if not sig:
        return False
    try:
        tag = bytes.fromhex(sig)
    except ValueError:
        return False
    return verify(_run_payload(run.name, run.version, run.code, run.deps), tag, "run")


def check_run(run, home) -> None:
    """Refuse to execute ``run``'s recorded cells unless this user signed them."""
    if not run_verifies(run):
        raise UntrustedStoreError(refusal(home, f"the recorded cells of {run.label}"))


def refusal(home, what: str) -> str:
    """Why a store is refused, what the risk is, and the explicit way to trust it."""
    return (f"flor_nb will not replay {what} in {home}: they are not signed with your key ({key_path()}). "
            "The store was written by someone else or by a flor_nb older than 0.2, or was changed since. "
            "Replaying runs its recorded cells and unpickles its checkpoints, and either can run any program as "
            f"you. If you trust where this store came from, run flor.trust({str(home)!r}) once (or add --trust "
            "to the %%flor line): it checks the store for damage and re-signs it with your key.")
