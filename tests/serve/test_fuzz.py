"""Schemathesis against the app's own OpenAPI document: every route, with and without keys.

No response may be a 5xx or hang, and every 4xx must have OpenAI's error shape.
"""

import collections

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

pytestmark = pytest.mark.slow

ERROR_KEYS = {"message", "type", "param", "code"}
PUBLIC = ("/health", "/ui", "/metrics", "/version")


SEEN: collections.Counter = collections.Counter()


def check(response) -> None:
    SEEN[response.status_code // 100] += 1
    assert response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        assert set(response.json()["error"]) == ERROR_KEYS, response.text[:300]
        assert "Traceback" not in response.text


def fuzz(base_url: str, test, examples: int = 12) -> list[str]:
    """Run `test(case)` on generated cases of every operation; returns the operations it covered."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    covered = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(case=operation.as_strategy())
        def run(case):
            test(case)

        run()
        covered.append(f"{operation.method.upper()} {operation.path}")
    return covered


def test_fuzz_open_app(main_app):
    covered = fuzz(main_app, lambda case: check(case.call(base_url=main_app, timeout=60)))
    assert {"POST /v1/chat/completions", "POST /v1/adapters", "DELETE /v1/adapters/{name}"} <= set(covered)
    assert SEEN[2] and SEEN[4], SEEN  # it reached both the happy path and the validation
