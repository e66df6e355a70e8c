"""Schemathesis against an app's own OpenAPI document (tests/serve/test_fuzz.py, test_guarded_app.py).

No response may be a 5xx or hang, and every 4xx must have OpenAI's error shape.
"""

import collections

import schemathesis
from hypothesis import HealthCheck, given, settings

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
