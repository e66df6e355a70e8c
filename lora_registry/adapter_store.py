"""The registry's records and their store. Every change commits before it is acknowledged."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, astuple, dataclass, field, fields
from pathlib import Path

from lora_registry.database import Database
from lora_registry.key_store import KeyRecord
from serve_app.messages import AdapterRef


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
    checksum: str | None = None  # of the files at a URL `path` (remote_sources.py); None: a local folder

    def to_dict(self) -> dict:
        return {**asdict(self), "target_modules": list(self.target_modules)}

    def ref(self) -> AdapterRef:
        """The adapter as a request carries it to an engine replica."""
        return AdapterRef(self.name, self.adapter_id, self.path, self.checksum)


@dataclass(frozen=True)
class RegistryState:
    """What the registry's followers (ingress and engine replicas) keep: every record, and a version
    that changes with every change (and with a registry restart)."""

    version: str
    adapters: Mapping[str, AdapterRecord]
    keys: Mapping[str, KeyRecord] = field(default_factory=dict)  # tenant keys in force, by key hash
    # once a tenant key was ever created every /v1 request needs a key, also after the last is revoked
    keys_on: bool = False
    # base model -> the modules its engines apply LoRA to (None: all; engines/lora_targets.py)
    engine_modules: Mapping[str, tuple[str, ...] | None] = field(default_factory=dict)
    # stored adapters not served: name -> their base model, which runs here without LoRA or not at all
    unserved: Mapping[str, str] = field(default_factory=dict)

    def supersedes(self, other: RegistryState) -> bool:
        """Whether this state is at least as new as `other`. Versions are "<run>:<change counter>";
        a state of another registry run (a restart) always is: its counter starts again."""
        run, _, counter = self.version.partition(":")
        other_run, _, other_counter = other.version.partition(":")
        return run != other_run or int(counter) >= int(other_counter)


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
    lora_modules: tuple[str, ...] | None = None  # modules the engine applies LoRA to (None: all)


@dataclass(frozen=True)
class AdapterPlacement:
    """A record and the engine replicas that hold its adapter now."""

    record: AdapterRecord
    replicas: tuple[str, ...]
    served: bool = True  # False: kept from a run whose model had LoRA; this one's has not (RegistryState.unserved)

    def to_dict(self) -> dict:
        return {**self.record.to_dict(), "replicas": list(self.replicas), "served": self.served}


class AdapterStore:
    """name -> AdapterRecord in the registry's database (database.py: SQLite file or PostgreSQL)."""

    def __init__(self, path: str | Path | None = None, database: Database | None = None):
        self.db = database or Database(f"sqlite:///{path}")

    def all(self) -> dict[str, AdapterRecord]:
        rows = self.db.run(lambda: self.db.query(f"SELECT {_COLUMNS} FROM adapters ORDER BY adapter_id"))
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
        checksum: str | None = None,
    ) -> AdapterRecord:
        """Insert or replace `name`, with a fresh adapter id, in one transaction."""

        def put() -> AdapterRecord:
            with self.db.transaction():
                adapter_id = self._next("adapter_id")
                previous = self.db.query("SELECT version FROM adapters WHERE name = ?", (name,))
                version = (previous[0][0] + 1) if previous else 1
                record = AdapterRecord(
                    name,
                    adapter_id,
                    path,
                    base_model,
                    rank,
                    tuple(target_modules),
                    version,
                    time.time(),
                    pinned,
                    preload,
                    checksum,
                )
                row = (
                    *astuple(record)[:5],
                    json.dumps(list(target_modules)),
                    *astuple(record)[6:8],
                    int(pinned),
                    int(preload),
                    checksum,
                )
                updates = ", ".join(f"{c} = excluded.{c}" for c in _COLUMN_NAMES[1:])
                self.db.query(
                    f"INSERT INTO adapters ({_COLUMNS}) VALUES ({', '.join('?' * len(row))}) "
                    f"ON CONFLICT (name) DO UPDATE SET {updates}",
                    row,
                )
            return record

        return self.db.run(put)

    def set_flags(self, name: str, pinned: bool, preload: bool) -> AdapterRecord:
        def set_flags() -> AdapterRecord:
            with self.db.transaction():
                self.db.query(
                    "UPDATE adapters SET pinned = ?, preload = ? WHERE name = ?", (int(pinned), int(preload), name)
                )
                return _record(self.db.query(f"SELECT {_COLUMNS} FROM adapters WHERE name = ?", (name,))[0])

        return self.db.run(set_flags)

    def delete(self, name: str) -> None:
        self.db.run(lambda: self.db.query("DELETE FROM adapters WHERE name = ?", (name,)))

    def integrity_ok(self) -> bool:
        return self.db.run(self.db.integrity_ok)

    def _next(self, key: str) -> int:
        """The counter's next value, atomically (inside the caller's transaction)."""
        return self.db.query(
            "INSERT INTO counters VALUES (?, 1) ON CONFLICT (key) DO UPDATE SET value = counters.value + 1 "
            "RETURNING value",
            (key,),
        )[0][0]


_COLUMN_NAMES = [f.name for f in fields(AdapterRecord)]  # the table's columns, in the record's order
_COLUMNS = ", ".join(_COLUMN_NAMES)


def _record(row) -> AdapterRecord:
    name, adapter_id, path, base, rank, targets, version, created, pinned, preload, checksum = row
    targets = tuple(json.loads(targets))
    return AdapterRecord(
        name, adapter_id, path, base, rank, targets, version, created, bool(pinned), bool(preload), checksum
    )
