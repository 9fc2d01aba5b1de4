"""The store's database schema: tables, migrations from older stores, and what a row's checksum covers.

Schema 5 (flor_nb 0.2) adds a checksum to every log row and packed series row,
a signature to every run (signing.py) and the owning process to every replay.
A schema 4 store gains them when first opened (its older rows have no
checksum: they are read as they are).
"""
from __future__ import annotations

import xxhash

SCHEMA_VERSION = 5
# Schema 4 stores gain value checksums, run signatures and replay owners when first opened.
MIGRATE = {4: ["ALTER TABLE logs ADD COLUMN crc INTEGER", "ALTER TABLE series ADD COLUMN crc INTEGER",
                "ALTER TABLE runs ADD COLUMN sig TEXT", "ALTER TABLE replays ADD COLUMN owner TEXT"]}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    status TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    epochs_completed INTEGER NOT NULL DEFAULT 0,
    epochs_total INTEGER,
    code TEXT NOT NULL,
    deps TEXT NOT NULL DEFAULT '[]',
    args TEXT NOT NULL DEFAULT '{}',
    env TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL DEFAULT '{}',
    timings TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    sig TEXT,                        -- HMAC of the recorded cells (signing.py)
    UNIQUE (name, version)
);
CREATE TABLE IF NOT EXISTS logs (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    name TEXT NOT NULL,
    epoch INTEGER,
    step INTEGER,
    seq INTEGER NOT NULL,
    value NOT NULL,                  -- a number, or JSON text
    kind TEXT NOT NULL DEFAULT 'recorded',
    replay_id INTEGER,
    crc INTEGER                      -- checksum of the row (see row_crc)
);
CREATE INDEX IF NOT EXISTS logs_run ON logs (run_id, kind, name, epoch);
CREATE TABLE IF NOT EXISTS series (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    name TEXT NOT NULL,
    epoch INTEGER,
    kind TEXT NOT NULL,
    replay_id INTEGER,
    typecode TEXT NOT NULL,          -- 'd' (float64) or 'q' (int64); 'Ed'/'Eq': one value per unit, units in steps
    steps BLOB NOT NULL,             -- int64 arrays, one entry per value
    seqs BLOB NOT NULL,
    vals BLOB NOT NULL,
    crc INTEGER
);
CREATE INDEX IF NOT EXISTS series_run ON series (run_id, kind, name, epoch);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    epoch INTEGER NOT NULL,          -- taken in this epoch; -1: before the epoch loop
    kind TEXT NOT NULL,              -- 'start', 'step' (at the step loop's exit) or 'end' (epoch end)
    path TEXT NOT NULL,
    bytes INTEGER NOT NULL,          -- bytes new on disk (unchanged tensors are shared)
    logical_bytes INTEGER NOT NULL,  -- bytes of the whole state
    checksum TEXT NOT NULL,
    digest TEXT NOT NULL,
    end_digest TEXT,                 -- for 'step' checkpoints: the state at the epoch end, too
    end_path TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (run_id, epoch)
);
CREATE TABLE IF NOT EXISTS digests (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    epoch INTEGER NOT NULL,
    kind TEXT NOT NULL,              -- 'step' (at the step loop's exit) or 'end' (epoch end)
    digest TEXT NOT NULL,            -- JSON {stream: digest}: the state, for epochs without a checkpoint there
    PRIMARY KEY (run_id, epoch, kind)
);
CREATE TABLE IF NOT EXISTS replays (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    code TEXT NOT NULL,
    cells TEXT NOT NULL DEFAULT '{}',
    epochs TEXT NOT NULL,
    probes TEXT NOT NULL DEFAULT '[]',
    started REAL NOT NULL,
    duration REAL,
    status TEXT NOT NULL,
    fidelity TEXT NOT NULL DEFAULT '{}',
    plan TEXT NOT NULL DEFAULT '{}',
    owner TEXT                       -- host:pid of the process running it
);
"""


SERIES_MIN = 16  # step values of one name in one epoch from which they are packed


def packable(steps, values, types=None) -> bool:
    """Are these step values stored packed, as one ``series`` row of arrays (NaN and inf included)?"""
    types = set(map(type, values)) if types is None else types
    if len(values) < SERIES_MIN or None in steps or not types <= {float, int}:
        return False
    return types != {int} or -(1 << 63) <= min(values) and max(values) < (1 << 63)


def row_crc(run_id, name, epoch, step, seq, value, kind, replay_id) -> int:
    """A log row's checksum, as a signed 64-bit SQLite integer (values keep their type: 1 and 1.0 differ)."""
    text = repr((run_id, name, epoch, step, seq, type(value).__name__, value, kind, replay_id))
    return xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass")) - (1 << 63)


def series_crc(run_id, name, epoch, kind, replay_id, typecode, steps, seqs, vals) -> int:
    h = xxhash.xxh3_64(repr((run_id, name, epoch, kind, replay_id, typecode, len(steps), len(seqs))).encode())
    for part in (steps, seqs, vals):
        h.update(part)
    return h.intdigest() - (1 << 63)
