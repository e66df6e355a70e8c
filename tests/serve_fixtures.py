"""Real Ray Serve + real vLLM on the CPU, reached over HTTP with the official openai client."""

from __future__ import annotations

import os
import tempfile

import pytest

from serve_app.config import AppConfig
from serve_app.model_types import TINY_CHAT_DIR, XIAO_HUANG_DIR

PORT = 8765
BASE = f"http://127.0.0.1:{PORT}"
API_KEY = "sk-test-key"
ADMIN_KEY = "sk-admin-key"
STATE = tempfile.mkdtemp(prefix="lorafleet-test-state-")
# Engine options for tests whose subject is not the compiled model (routing, registry, failures):
# without torch.compile a vLLM engine starts in about 25 s instead of 40 s of CPU here. The main app,
# the offline engine of the oracle tests, the examples and the CLI keep the defaults users get.
FAST_START = {"enforce_eager": True}


def main_config() -> AppConfig:
    return AppConfig.model_validate(
        {
            "models": [
                {
                    "model_type": "tiny-chat",
                    "engine": {"max_model_len": 512, "max_loras": 2},
                    "lora_modules": {"xiao-huang": str(XIAO_HUANG_DIR)},
                    "deployment": {"num_replicas": 1},
                },
                {  # a generation-only model type, on the pt backend (cheap to start)
                    "name": "tiny-base",
                    "model_type": "qwen-7b",
                    "model_id_or_path": str(TINY_CHAT_DIR),
                    "infer_backend": "pt",
                    "engine": {"max_model_len": 512},
                    "deployment": {"num_replicas": 1},
                },
            ],
            "ingress": {"max_body_bytes": 64 * 1024},
            "registry": {"state_dir": f"{STATE}/main"},
        }
    )


def guarded_config() -> AppConfig:
    """API key on, and a queue of one so overload is easy to reach."""
    return AppConfig.model_validate(
        {
            "models": [
                {
                    "name": "guarded",
                    "model_type": "tiny-chat",
                    "infer_backend": "pt",
                    "deployment": {"num_replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 1},
                }
            ],
            "ingress": {"api_key": API_KEY, "admin_api_key": ADMIN_KEY},
            "registry": {"state_dir": f"{STATE}/guarded"},
        }
    )


# Ray's background work that no test reads, turned down for the suite: with the main and guarded
# apps idle, the machine was 19% busy (of 2 cores) and 10% with these. Task events and Ray's own
# metrics feed the dashboard and `ray list`; the Serve controller reconciles every 0.5 s instead of
# 0.1 s (state changes show up to 0.4 s later). lorafleet's /metrics is its own (prometheus_client).
QUIET_RAY = {
    "RAY_task_events_report_interval_ms": "0",
    "RAY_enable_metrics_collection": "0",
    "RAY_metrics_report_interval_ms": "60000",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
}


@pytest.fixture(scope="session")
def serve_instance():
    import ray
    from ray import serve

    from serve_app.platform import apply_serve_env

    apply_serve_env()  # the tests run with the Serve settings users get
    # but for one: an ingress replica that stops waits this long (default 30 s) for external load
    # balancers to stop sending it requests; here HAProxy is on the same node, and every app a test
    # deletes would wait it out.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    for key, value in QUIET_RAY.items():
        os.environ.setdefault(key, value)
    ray.init(num_cpus=12, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    yield serve
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def main_app(serve_instance):
    from serve_app.app import build_from_config

    serve_instance.run(build_from_config(main_config()), name="main", route_prefix="/")
    return BASE


@pytest.fixture
def client(main_app):
    from openai import OpenAI

    return OpenAI(base_url=f"{main_app}/v1", api_key="EMPTY", max_retries=0)
