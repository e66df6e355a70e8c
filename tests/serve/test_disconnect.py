"""A client that disconnects mid-stream aborts its engine request."""

import time

import httpx
import pytest
from ray import serve

pytestmark = pytest.mark.slow


def running(model: str) -> int:
    handle = serve.get_deployment_handle(f"LLMServer:{model}", app_name="main")
    return handle.num_running.remote().result()


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
