"""Tenant keys through a running app's admin API (`lorafleet keys ...` and Python callers)."""

from __future__ import annotations

import os
from typing import Any

import httpx

from serve_app.errors import LorafleetError

ADMIN_KEY_ENV = "LORAFLEET_ADMIN_API_KEY"


class AdminClient:
    """`url` is the app's address (as clients use it, without /v1); the admin key defaults to
    $LORAFLEET_ADMIN_API_KEY so that it stays out of shell history."""

    def __init__(self, url: str = "http://127.0.0.1:8000", admin_api_key: str | None = None, timeout_s: float = 30):
        key = admin_api_key or os.environ.get(ADMIN_KEY_ENV)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def create_key(self, name: str, **spec: Any) -> dict:
        """A new tenant key; the answer's `key` is the secret, shown this once."""
        return self._call("POST", "/v1/keys", json={"name": name, **spec})

    def list_keys(self) -> list[dict]:
        return self._call("GET", "/v1/keys")["data"]

    def revoke_key(self, name: str) -> dict:
        return self._call("DELETE", f"/v1/keys/{name}")

    def _call(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise LorafleetError(f"cannot reach {self.url} ({e}); is the app running (lorafleet deploy)?") from None
        body = _json(response)
        if response.status_code >= 400:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            raise LorafleetError(f"{response.status_code}: {error.get('message') or response.text[:200]}")
        return body

    def close(self) -> None:
        self.http.close()


def _json(response: httpx.Response):
    try:
        return response.json()
    except ValueError:
        return {}
