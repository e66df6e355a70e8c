"""Who is calling, what it may see and use, and its per-minute limits.

Callers: nobody checked (no key configured and no tenant key exists), the config's `api_key` (every
model), its `admin_api_key` (every model and the admin routes), or a tenant key of the registry
(key_store.py), which sees the base models or the patterns it was given, plus its tenant's own
adapters (`<tenant>:...`). Once a tenant key exists, every /v1 request needs some key, and the admin
routes, `/metrics` and `/v1/adapters` need the admin key. Another tenant's adapter is answered
exactly as a name that does not exist (404), so a key cannot learn which adapters others have.
"""

from __future__ import annotations

import fnmatch
import hmac
import math
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from fastapi import Request

from lora_registry.key_store import KeyRecord, hash_key
from serve_app.config import IngressConfig
from serve_app.errors import AuthenticationError, PermissionDeniedError, RateLimitError


@dataclass(frozen=True)
class Caller:
    role: str  # "open", "api_key", "admin" or "tenant"
    key: KeyRecord | None = None
    reserved_tokens: float = 0.0  # what the rate limiter set aside for this request (RateLimits.admit)

    @property
    def tenant(self) -> str | None:
        return self.key.tenant if self.key else None

    def may_use(self, name: str, base_models: Collection[str]) -> bool:
        if self.key is None:
            return True
        if name.startswith(self.key.adapter_prefix):
            return True
        if ":" in name:  # `<tenant>:...` is that tenant's alone, whatever the key's patterns say
            return False
        if not self.key.models:
            return name in base_models
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.key.models)

    def owns(self, adapter_name: str) -> bool:
        return self.key is None or adapter_name.startswith(self.key.adapter_prefix)


OPEN, API_KEY, ADMIN = Caller("open"), Caller("api_key"), Caller("admin")


class Gate:
    """Checks `Authorization: Bearer ...` against the config's keys and the tenant keys in force."""

    def __init__(self, config: IngressConfig):
        self.api_key = config.api_key
        self.admin_api_key = config.admin_api_key

    def caller(self, request: Request, keys: Mapping[str, KeyRecord], keys_on: bool = False) -> Caller | None:
        """The caller of a /v1 route, or None for a key that is given but unknown (maybe created a
        moment ago through another ingress replica: the caller may refresh and ask again)."""
        given = bearer(request)
        if given and self.admin_api_key is not None and _same(given, self.admin_api_key):
            return ADMIN
        if given and self.api_key is not None and _same(given, self.api_key):
            return API_KEY
        if given and (key := keys.get(hash_key(given))) is not None:
            return Caller("tenant", key)
        if self.api_key is None and not keys and not keys_on:
            return OPEN
        return None

    @staticmethod
    def refused() -> AuthenticationError:
        return AuthenticationError(
            "missing or wrong API key; send `Authorization: Bearer <api_key>`.", code="invalid_api_key"
        )

    def admin(
        self, request: Request, keys: Mapping[str, KeyRecord], tenants_may_register: bool = False, keys_on: bool = False
    ) -> Caller:
        """The caller of an admin route: the admin key, or (for adapter changes) a tenant key that
        may register adapters. Open only while no key of any kind is configured or exists."""
        keys_on = keys_on or bool(keys)
        if self.api_key is None and self.admin_api_key is None and not keys_on:
            return OPEN
        caller = self.caller(request, keys, keys_on)
        if caller is ADMIN:
            return caller
        if caller is not None and caller.key is not None and tenants_may_register and caller.key.can_register:
            return caller
        if caller is not None and caller is not OPEN:
            what = "this key may not register adapters; " if tenants_may_register and caller.key else ""
            given = "a tenant key" if caller.key is not None else "the api_key"
            raise PermissionDeniedError(
                f"{what}admin routes need the admin_api_key, not {given}.", code="admin_key_required"
            )
        if keys_on and self.admin_api_key is None:
            raise AuthenticationError(
                "tenant keys are on, and the admin routes need ingress.admin_api_key, which is not set.",
                code="admin_key_not_configured",
            )
        raise AuthenticationError(
            "missing or wrong admin key; send `Authorization: Bearer <admin_api_key>`.", code="invalid_api_key"
        )


class _Bucket:
    """A token bucket: `per_minute` tokens, refilled evenly. It may go below zero (a prompt's tokens
    are known only once rendered); a request is admitted while it holds `need`."""

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.capacity = per_minute
        self.level = per_minute
        self.at = time.monotonic()

    def wait_s(self, need: float) -> float:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now
        return 0.0 if self.level >= need else (need - self.level) / self.rate


class RateLimits:
    """Each tenant key's requests/minute and tokens/minute, enforced by this ingress replica on its
    share of them (1 / the ingress's replicas: Serve spreads requests over them evenly)."""

    def __init__(self, share: float):
        self.share = share
        self.buckets: dict[str, tuple[_Bucket | None, _Bucket | None]] = {}  # by key hash

    def admit(self, key: KeyRecord, max_tokens: int | None = None) -> float:
        """Admit one request or raise 429. It reserves `max_tokens` (what it may generate: many
        requests at once cannot all overdraw the tokens/minute) up to the bucket's size, or one
        token when the request gives no bound; `settle` charges what it really used. Returns the
        tokens reserved."""
        requests, tokens = self._buckets(key)
        reserve = 1.0 if tokens is None else min(float(max_tokens or 1), tokens.capacity)
        for bucket, kind, need in ((requests, "requests", 1.0), (tokens, "tokens", reserve)):
            if bucket is not None and (wait := bucket.wait_s(need)) > 0:
                limit = key.requests_per_minute if kind == "requests" else key.tokens_per_minute
                raise RateLimitError(kind, limit, math.ceil(wait))
        if requests is not None:
            requests.level -= 1
        if tokens is not None:
            tokens.level -= reserve
        return reserve

    def settle(self, key: KeyRecord, reserved: float, used: int) -> None:
        """Charge the tokens a request used (prompt and completion) in place of its reservation."""
        _, bucket = self._buckets(key)
        if bucket is not None:
            bucket.wait_s(0)  # refill to now first
            bucket.level -= used - reserved

    def _buckets(self, key: KeyRecord) -> tuple[_Bucket | None, _Bucket | None]:
        if key.key_hash not in self.buckets:
            rpm, tpm = key.requests_per_minute, key.tokens_per_minute
            self.buckets[key.key_hash] = (
                _Bucket(max(1.0, rpm * self.share)) if rpm else None,
                _Bucket(max(1.0, tpm * self.share)) if tpm else None,
            )
        return self.buckets[key.key_hash]


def bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    return header[7:] if header[:7].lower() == "bearer " else ""


def _same(given: str, key: str) -> bool:
    return hmac.compare_digest(given.encode(), key.encode())
