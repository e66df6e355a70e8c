"""Tenant API keys: records in the registry's database, stored hashed, followed by every ingress.

A key is `lf-` + 43 random URL-safe characters (256 bits). Only its SHA-256 is stored: with that
much entropy a salted slow hash adds nothing (as GitHub and Stripe store theirs), and the ingress can
look a key up by its hash in one dict access. The secret is shown once, when the key is created.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass, field, fields

from lora_registry.database import Database
from serve_app.errors import ConflictError, InvalidRequestError, NotFoundError

KEY_PREFIX = "lf-"
# A tenant's adapters are named `<tenant>:<anything>`; the tenant name itself has no ':'.
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class KeySpec:
    """What an admin asks for when creating a key (the admin API body and `lorafleet keys create`)."""

    name: str
    tenant: str | None = None  # default: the key's name; keys of one tenant share its adapters
    models: tuple[str, ...] = ()  # fnmatch patterns of models/adapters it may use; () = the base models
    can_register: bool = False  # may register adapters named `<tenant>:...` (and remove its own)
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def checked(self) -> KeySpec:
        if not isinstance(self.name, str) or not KEY_NAME.match(self.name):
            raise InvalidRequestError(
                f"key name '{self.name}' is not valid: letters, digits and . _ : @ - (up to 128).", param="name"
            )
        tenant = self.name if self.tenant is None else self.tenant
        if not isinstance(tenant, str) or not TENANT_NAME.match(tenant):
            raise InvalidRequestError(
                f"tenant '{tenant}' is not valid: letters, digits and . _ - (up to 64; no ':'), "
                "or give the key a name of that form.",
                param="name" if self.tenant is None else "tenant",
            )
        for limit in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, limit)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidRequestError(f"{limit} must be a positive integer or null.", param=limit)
        return KeySpec(
            self.name, tenant, tuple(self.models), self.can_register, self.requests_per_minute, self.tokens_per_minute
        )


@dataclass(frozen=True)
class KeyRecord:
    """One tenant key as stored (no secret). `key_hint` is the secret's start, to tell keys apart."""

    name: str
    tenant: str
    key_hash: str = field(repr=False)
    key_hint: str
    models: tuple[str, ...]
    can_register: bool
    requests_per_minute: int | None
    tokens_per_minute: int | None
    created_at: float
    revoked_at: float | None = None

    @property
    def adapter_prefix(self) -> str:
        return f"{self.tenant}:"

    def to_dict(self) -> dict:
        """The public view (admin API, CLI): everything but the hash."""
        return {
            "object": "api_key",
            "name": self.name,
            "tenant": self.tenant,
            "key_hint": self.key_hint,
            "models": list(self.models),
            "can_register": self.can_register,
            "adapter_prefix": self.adapter_prefix,
            "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
        }


_COLUMN_NAMES = [f.name for f in fields(KeyRecord)]
_COLUMNS = ", ".join(_COLUMN_NAMES)


class KeyStore:
    """api_keys rows in the registry's database; every change commits before it returns."""

    def __init__(self, db: Database):
        self.db = db

    def all(self) -> list[KeyRecord]:
        rows = self.db.run(lambda: self.db.query(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, name"))
        return [_record(row) for row in rows]

    def create(self, spec: KeySpec) -> tuple[KeyRecord, str]:
        """A new key for `spec` and its secret (returned once, never stored)."""
        spec = spec.checked()
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        record = KeyRecord(
            spec.name,
            spec.tenant,
            hash_key(secret),
            secret[:8] + "...",
            spec.models,
            spec.can_register,
            spec.requests_per_minute,
            spec.tokens_per_minute,
            time.time(),
        )

        def insert() -> None:
            with self.db.transaction():
                if self.db.query("SELECT 1 FROM api_keys WHERE name = ?", (spec.name,)):
                    raise ConflictError(
                        f"a key named '{spec.name}' exists (names of revoked keys are kept); pick another name.",
                        param="name",
                        code="key_exists",
                    )
                row = [*_row(record)]
                self.db.query(f"INSERT INTO api_keys ({_COLUMNS}) VALUES ({', '.join('?' * len(row))})", tuple(row))

        self.db.run(insert)
        return record, secret

    def revoke(self, name: str) -> KeyRecord:
        def revoke() -> KeyRecord:
            with self.db.transaction():
                rows = self.db.query(f"SELECT {_COLUMNS} FROM api_keys WHERE name = ?", (name,))
                if not rows:
                    raise NotFoundError(f"no key named '{name}'; GET /v1/keys lists them.", param="name")
                if rows[0][-1] is None:
                    self.db.query("UPDATE api_keys SET revoked_at = ? WHERE name = ?", (time.time(), name))
                return _record(self.db.query(f"SELECT {_COLUMNS} FROM api_keys WHERE name = ?", (name,))[0])

        return self.db.run(revoke)


def _row(record: KeyRecord) -> tuple:
    values = [getattr(record, name) for name in _COLUMN_NAMES]
    values[_COLUMN_NAMES.index("models")] = json.dumps(list(record.models))
    values[_COLUMN_NAMES.index("can_register")] = int(record.can_register)
    return tuple(values)


def _record(row) -> KeyRecord:
    values = dict(zip(_COLUMN_NAMES, row, strict=True))
    values["models"] = tuple(json.loads(values["models"]))
    values["can_register"] = bool(values["can_register"])
    return KeyRecord(**values)
