"""Autoscaling for real, and tensor parallelism 2 through the graph."""

import concurrent.futures as futures
import threading
import time

import httpx
import openai
import pytest
from ray import serve

from serve_app.app import build_from_config
from serve_app.config import AppConfig
from tests.serve_fixtures import BASE, STATE

pytestmark = pytest.mark.slow


def replicas(app: str, deployment: str) -> int:
    status = serve.status().applications[app].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(serve_instance):
    config = AppConfig.model_validate(
        {
            "registry": {"state_dir": f"{STATE}/auto"},
            "models": [
                {
                    "name": "tiny-auto",
                    "model_type": "tiny-chat",
                    "infer_backend": "pt",
                    "deployment": {
                        "max_ongoing_requests": 4,
                        "autoscaling": {
                            "min_replicas": 1,
                            "max_replicas": 2,
                            "target_ongoing_requests": 1,
                            "upscale_delay_s": 1,
                            "downscale_delay_s": 3,
                            "metrics_interval_s": 0.5,
                            "look_back_period_s": 1,
                        },
                    },
                }
            ],
        }
    )
    serve_instance.run(build_from_config(config), name="auto", route_prefix="/auto")
    deployment = "LLMServer:tiny-auto"
    assert replicas("auto", deployment) == 1
    stop = threading.Event()
    body = {"model": "tiny-auto", "prompt": "1, 2,", "max_tokens": 60, "ignore_eos": True}

    def load():
        while not stop.is_set():
            httpx.post(f"{BASE}/auto/v1/completions", json=body, timeout=120)

    with futures.ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(load)
        try:
            assert wait_for(lambda: replicas("auto", deployment) == 2, timeout=120)
        finally:
            stop.set()
    assert wait_for(lambda: replicas("auto", deployment) == 1, timeout=120)
    serve.delete("auto")


def test_tensor_parallel_2_through_the_graph(serve_instance, main_app):
    config = AppConfig.model_validate(
        {
            "registry": {"state_dir": f"{STATE}/tp2"},
            "models": [
                {
                    "name": "tiny-tp2",
                    "model_type": "tiny-chat",
                    "engine": {"tensor_parallel_size": 2, "max_model_len": 512},
                    "deployment": {"num_replicas": 1},
                }
            ],
        }
    )
    serve_instance.run(build_from_config(config), name="tp2", route_prefix="/tp2")
    try:
        tp2 = openai.OpenAI(base_url=f"{BASE}/tp2/v1", api_key="x", max_retries=0)
        tp1 = openai.OpenAI(base_url=f"{BASE}/v1", api_key="x", max_retries=0)
        for query in ["浙江的省会在哪？", "Tell me a story.", "who are you?"]:
            messages = [{"role": "user", "content": query}]
            a = tp2.chat.completions.create(model="tiny-tp2", messages=messages, temperature=0)
            b = tp1.chat.completions.create(model="tiny-chat", messages=messages, temperature=0)
            assert a.choices[0].message.content == b.choices[0].message.content
    finally:
        serve.delete("tp2")
