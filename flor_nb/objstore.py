"""Checkpoint files and blobs on any fsspec filesystem (``s3://``, ``gs://``, ``file://``, ...).

A run's *blob location* holds its checkpoint files and the content-addressed blobs
they refer to, with the same layout as a local store (``checkpoints/...``,
``blobs/ab/ab...``); the SQLite index stays with the notebook, its only writer.
A location is a local path (the store's folder by default, or a shared one) or a
URL; only URLs come here, so a local store pays nothing for this module.

Writes are atomic in the way each filesystem allows: where the filesystem can
rename (local, ``file://``) a temp file is written and renamed; on object stores,
which cannot rename, the object is written to its final key in one request (a
single PUT, or a multipart upload that the store completes atomically), so a
reader never sees a partial object. Every read is verified by hash in
:mod:`flor_nb.checkpoint`, as for a local store.

Credentials and endpoints come from the filesystem's own configuration on each
machine (for S3: the AWS environment variables, ``~/.aws``, or fsspec's
``FSSPEC_S3_*`` variables); flor_nb never stores or ships them.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

from .errors import FlorError

ENV = "FLOR_NB_BLOBS"  # default blob location for new recordings
_FS: dict = {}  # url -> (filesystem, root path): one client per process and location
_RENAMES = {"file", "local"}  # protocols with an atomic rename
_SEEN: set = set()  # (url, rel) of blobs this process wrote or found: content-addressed, so never asked again


class ObjectStoreError(FlorError):
    """The blob location cannot be reached or written (missing package, credentials, bucket)."""


def is_url(location) -> bool:
    """A location fsspec must handle (``s3://b/p``); local paths, ``str`` or ``Path``, are not."""
    return isinstance(location, str) and "://" in location


def location(blobs=None) -> str | None:
    """The blob location for a new recording: ``blobs``, else ``$FLOR_NB_BLOBS``, else None (the store's folder).
    A local path is made absolute, so replay workers started elsewhere find it."""
    blobs = blobs if blobs is not None else os.environ.get(ENV) or None
    if blobs is None:
        return None
    blobs = str(blobs).rstrip("/")
    return blobs if is_url(blobs) else os.path.abspath(os.path.expanduser(blobs))


def _fs(url: str):
    if url not in _FS:
        try:
            from fsspec.core import url_to_fs
        except ImportError:  # pragma: no cover - fsspec comes with torch
            raise ObjectStoreError(f"Blob location {url} needs fsspec: pip install fsspec.") from None
        try:
            fs, root = url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise ObjectStoreError(f"Blob location {url}: {e}. For s3:// install flor_nb[s3] (s3fs).") from None
        _FS[url] = (fs, root.rstrip("/"))
    return _FS[url]


def where(url: str, rel: str) -> str:
    """The full URL of ``rel`` under ``url`` (for messages)."""
    return f"{url.rstrip('/')}/{rel}"


def get(url: str, rel: str) -> bytes:
    """The bytes of ``rel``; ``FileNotFoundError`` when it is not there."""
    fs, root = _fs(url)
    try:
        return fs.cat_file(f"{root}/{rel}")
    except FileNotFoundError:
        raise
    except OSError as e:
        if getattr(e, "errno", None) == 2:
            raise FileNotFoundError(where(url, rel)) from None
        raise ObjectStoreError(f"Cannot read {where(url, rel)}: {e}") from None


def exists(url: str, rel: str) -> bool:
    """Whether ``rel`` is there; a blob seen once is taken as there (one request saved per blob and checkpoint)."""
    if (url, rel) in _SEEN:
        return True
    fs, root = _fs(url)
    try:
        found = fs.exists(f"{root}/{rel}")
    except OSError as e:
        raise ObjectStoreError(f"Cannot reach {where(url, rel)}: {e}") from None
    if found and rel.startswith("blobs/"):
        _SEEN.add((url, rel))
    return found


def put(url: str, rel: str, data) -> None:
    """Write ``data`` to ``rel`` so that readers see all of it or nothing."""
    fs, root = _fs(url)
    path = f"{root}/{rel}"
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    try:
        if protocol in _RENAMES:
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            tmp = f"{path.rsplit('/', 1)[0]}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
            fs.pipe_file(tmp, bytes(data))
            fs.mv(tmp, path)
        else:  # object stores: the object appears at its key only once the upload completes
            fs.pipe_file(path, bytes(data))
    except OSError as e:
        raise ObjectStoreError(f"Cannot write {where(url, rel)}: {e}") from None
    if rel.startswith("blobs/"):
        _SEEN.add((url, rel))


def check(location) -> None:
    """Fail before training, naming the fix, when checkpoints cannot be written to ``location`` (a missing
    package such as s3fs, credentials, a bucket): a failed write during training only warns and trains on
    without checkpoints, and a run without checkpoints cannot be replayed. A URL gets a small object written
    and removed; a folder, its nearest existing parent checked for write access (nothing is created)."""
    if not is_url(location):
        parent = os.path.abspath(location)
        while not os.path.exists(parent) and os.path.dirname(parent) != parent:
            parent = os.path.dirname(parent)
        if not (os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)):
            raise ObjectStoreError(f"Cannot write checkpoints to {location}: {parent} is not a folder you can write. "
                                   "Pick another (blobs=, FLOR_NB_BLOBS, --store).")
        return
    rel = f".flor-nb-write-check-{uuid.uuid4().hex}"
    try:
        put(location, rel, b"")
        fs, root_path = _fs(location)
        fs.rm_file(f"{root_path}/{rel}")
    except ObjectStoreError as e:
        raise ObjectStoreError(f"{str(e).rstrip('.')}. Nothing was recorded: fix the location (its package, "
                               "credentials, bucket) or record without it.") from None
    except Exception as e:  # noqa: BLE001 - botocore's credential errors are not OSErrors
        raise ObjectStoreError(f"Cannot write to {location}: {type(e).__name__}: {e}. Nothing was recorded: fix "
                               "the location (its credentials, bucket) or record without it.") from None


def root(home, env: dict | None):
    """Where a run's checkpoint files and blobs are: its recorded blob location, else the store's folder."""
    blobs = (env or {}).get("blobs")
    if not blobs:
        return Path(home)
    return blobs if is_url(blobs) else Path(blobs)
