"""Schemathesis against the main app's OpenAPI document: every route (tests/serve/fuzzing.py)."""

import pytest

from tests.serve.fuzzing import SEEN, check, fuzz

pytestmark = pytest.mark.slow


def test_fuzz_open_app(main_app):
    covered = fuzz(main_app, lambda case: check(case.call(base_url=main_app, timeout=60)))
    assert {"POST /v1/chat/completions", "POST /v1/adapters", "DELETE /v1/adapters/{name}"} <= set(covered)
    assert SEEN[2] and SEEN[4], SEEN  # it reached both the happy path and the validation
