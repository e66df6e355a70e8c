"""A client that disconnects mid-stream aborts its engine request."""

import time

import httpx
import pytest

from tests.serve_fixtures import engine_running

pytestmark = pytest.mark.slow


def running(model: str) -> int:
    return engine_running(model)


@pytest.mark.parametrize("model", ["tiny-chat", "tiny-base"])
def test_disconnect_aborts_the_engine_request(main_app, model):
    body = {"model": model, "prompt": "1, 2, 3,", "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{main_app}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        assert running(model) == 1
    deadline = time.monotonic() + 5
    while running(model) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running(model) == 0
