"""The registry's persistent state: one SQLite file. Every change commits before it is acknowledged."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import asdict, astuple, dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class AdapterRecord:
    """One registered adapter. `adapter_id` is new for every (re)registration, never reused."""

    name: str
    adapter_id: int
    path: str
    base_model: str
    rank: int
    target_modules: tuple[str, ...]
    version: int
    created_at: float
    pinned: bool = False  # never evicted from an engine replica that holds it
    preload: bool = False  # loaded on every replica of its base at start and on registration

    def to_dict(self) -> dict:
        return {**asdict(self), "target_modules": list(self.target_modules)}


@dataclass(frozen=True)
class RegistryState:
    """What the registry's followers (ingress and engine replicas) keep: every record, and a version
    that changes with every change (and with a registry restart)."""

    version: str
    adapters: Mapping[str, AdapterRecord]


LOAD_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class ReplicaResidency:
    """What one engine replica reports of its adapters (with every change, and every few seconds)."""

    replica: str
    model: str
    adapter_ids: tuple[int, ...]  # in the engine now
    engine_slots: int  # adapters one batch can mix (max_loras)
    host_slots: int  # adapters the replica keeps loaded (max_cpu_loras)
    in_use: int  # held adapters that requests are generating with
    waiting: int  # requests waiting for a slot
    loads: int  # adapter loads since the replica started
    load_seconds: float  # their total time
    load_buckets: tuple[int, ...]  # loads that took at most LOAD_BUCKETS_S[i] seconds (cumulative)
    pinned: tuple[int, ...]  # held adapters that are never evicted


@dataclass(frozen=True)
class AdapterPlacement:
    """A record and the engine replicas that hold its adapter now."""

    record: AdapterRecord
    replicas: tuple[str, ...]

    def to_dict(self) -> dict:
        return {**self.record.to_dict(), "replicas": list(self.replicas)}


_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    adapter_id INTEGER NOT NULL UNIQUE,
    path TEXT NOT NULL,
    base_model TEXT NOT NULL,
    rank INTEGER NOT NULL,
    target_modules TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at REAL NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0,
    preload INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class AdapterStore:
    """name -> AdapterRecord in `<state_dir>/registry.sqlite`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(adapters)")}
        for column in ("pinned", "preload") if "pinned" not in columns else ():  # a state dir of before
            self.db.execute(f"ALTER TABLE adapters ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")

    def all(self) -> dict[str, AdapterRecord]:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM adapters ORDER BY adapter_id").fetchall()
        return {row[0]: _record(row) for row in rows}

    def put(
        self,
        name: str,
        path: str,
        base_model: str,
        rank: int,
        target_modules: tuple[str, ...],
        pinned: bool = False,
        preload: bool = False,
    ) -> AdapterRecord:
        """Insert or replace `name`, with a fresh adapter id, in one transaction."""
        with self._transaction():
            adapter_id = self._next("adapter_id")
            previous = self.db.execute("SELECT version FROM adapters WHERE name = ?", (name,)).fetchone()
            version = (previous[0] + 1) if previous else 1
            record = AdapterRecord(
                name, adapter_id, path, base_model, rank, tuple(target_modules), version, time.time(), pinned, preload
            )
            row = (*astuple(record)[:5], json.dumps(list(target_modules)), *astuple(record)[6:])
            self.db.execute(f"INSERT OR REPLACE INTO adapters ({_COLUMNS}) VALUES ({', '.join('?' * len(row))})", row)
        return record

    def set_flags(self, name: str, pinned: bool, preload: bool) -> AdapterRecord:
        with self._transaction():
            self.db.execute("UPDATE adapters SET pinned = ?, preload = ? WHERE name = ?", (pinned, preload, name))
            row = self.db.execute(f"SELECT {_COLUMNS} FROM adapters WHERE name = ?", (name,)).fetchone()
        return _record(row)

    def delete(self, name: str) -> None:
        with self._transaction():
            self.db.execute("DELETE FROM adapters WHERE name = ?", (name,))

    def integrity_ok(self) -> bool:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    def _next(self, key: str) -> int:
        row = self.db.execute("SELECT value FROM counters WHERE key = ?", (key,)).fetchone()
        value = (row[0] if row else 0) + 1
        self.db.execute("INSERT OR REPLACE INTO counters VALUES (?, ?)", (key, value))
        return value

    def _transaction(self):
        return _Transaction(self.db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


_COLUMNS = ", ".join(f.name for f in fields(AdapterRecord))  # the table's columns, in the record's order


def _record(row) -> AdapterRecord:
    name, adapter_id, path, base, rank, targets, version, created, pinned, preload = row
    return AdapterRecord(
        name, adapter_id, path, base, rank, tuple(json.loads(targets)), version, created, bool(pinned), bool(preload)
    )
