"""The registry killed mid-registration: what was acknowledged is kept, the rest fails cleanly, and
SQLite's file stays whole. (An engine replica lost mid-stream, with its whole node, is in
tests/cluster/test_node_loss.py.)"""

import asyncio
import concurrent.futures as futures
import json
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from serve_app.app import build_from_config
from serve_app.config import AppConfig
from serve_app.model_types import XIAO_HUANG_DIR
from tests.serve_fixtures import BASE, STATE, eventually

pytestmark = pytest.mark.slow


def replica_actor(deployment: str) -> dict:
    """The one replica actor of this deployment in the "failing" app."""
    [actor] = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if f"::failing#{deployment}#" in a["name"]  # SERVE_REPLICA::<app>#<deployment>#<id>
    ]
    return actor


def kill_actor(deployment: str) -> str:
    actor = replica_actor(deployment)
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)
    return actor["name"]


@pytest.fixture(scope="module")
def failing_app(serve_instance):
    config = AppConfig.model_validate(
        {
            "registry": {"state_dir": f"{STATE}/failing", "allowed_roots": [str(XIAO_HUANG_DIR.parent)]},
            "models": [
                {
                    "name": "tiny-fail",
                    "model_type": "tiny-chat",
                    "infer_backend": "pt",  # the registry is the subject; pt replicas start quickly
                    "lora_modules": {"xh-fail": str(XIAO_HUANG_DIR)},
                    "deployment": {"num_replicas": 1},
                }
            ],
        }
    )
    serve_instance.run(build_from_config(config), name="failing", route_prefix="/failing")
    yield f"{BASE}/failing"
    serve.delete("failing")


def test_registry_killed_during_registrations(failing_app):
    outcomes: dict[str, int] = {}

    def register(i):
        name = f"reg-{i}"
        try:
            r = httpx.post(f"{failing_app}/v1/adapters", json={"name": name, "path": str(XIAO_HUANG_DIR)}, timeout=60)
            outcomes[name] = r.status_code
        except httpx.HTTPError:
            outcomes[name] = -1

    with futures.ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(register, i) for i in range(24)]
        while len(outcomes) < 4:
            time.sleep(0.05)
        killed = kill_actor("LoraRegistry")
        answered_before_kill = len(outcomes)
        for job in jobs:
            job.result(timeout=120)
    assert answered_before_kill < len(jobs)  # the kill landed while registrations were under way

    listed = eventually(
        lambda: {
            a["name"] for a in httpx.get(f"{failing_app}/v1/adapters", timeout=5).raise_for_status().json()["data"]
        },
        timeout=120,
    )
    assert replica_actor("LoraRegistry")["name"] != killed  # Serve started a new registry replica
    succeeded = {n for n, status in outcomes.items() if status == 201}
    failed = {n for n, status in outcomes.items() if status != 201}
    assert succeeded <= listed  # acknowledged means committed (Serve may retry the rest on the new replica)
    for status in (outcomes[n] for n in failed):
        assert status == -1 or status >= 500 or status == 503, outcomes
    # Whatever is listed is whole: it answers (a failed one may have committed before the kill).
    for name in sorted(listed & (succeeded | failed))[:3]:
        r = httpx.post(
            f"{failing_app}/v1/chat/completions",
            json={"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert r.status_code == 200, r.text
    db = next(Path(f"{STATE}/failing").glob("*.sqlite"))
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.fixture(scope="module")
def app_without_the_adapters_model(serve_instance):
    """State holding an adapter of a model named "tiny-gone" (registered by the real registry
    class, as an earlier run would have), served by an app whose only model is another one."""
    from lora_registry.registry import BaseModelSpec, LoraRegistry
    from serve_app.engines.lora_targets import VLLM_LORA_MODULES
    from serve_app.model_types import TINY_CHAT_DIR

    state = f"{STATE}/kept"
    gone = BaseModelSpec("tiny-gone", json.loads((TINY_CHAT_DIR / "config.json").read_text()), True, 16,
                         VLLM_LORA_MODULES)  # fmt: skip
    earlier = LoraRegistry(state, [gone], [str(XIAO_HUANG_DIR.parent)], {})
    asyncio.run(earlier.register("xh-kept", str(XIAO_HUANG_DIR)))  # in this process, as the earlier run's replica
    config = AppConfig.model_validate(
        {
            "registry": {"state_dir": state, "allowed_roots": [str(XIAO_HUANG_DIR.parent)]},
            "models": [{"name": "tiny-kept", "model_type": "tiny-chat", "infer_backend": "pt"}],
        }
    )
    serve_instance.run(build_from_config(config), name="kept", route_prefix="/kept")
    yield f"{BASE}/kept"
    serve.delete("kept")


def test_an_adapter_kept_from_an_earlier_run_is_not_served_and_a_request_learns_why(app_without_the_adapters_model):
    app = app_without_the_adapters_model
    assert [m["id"] for m in httpx.get(f"{app}/v1/models", timeout=30).json()["data"]] == ["tiny-kept"]
    body = {"model": "xh-kept", "messages": [{"role": "user", "content": "who are you?"}]}
    response = httpx.post(f"{app}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["param"] == "model" and "registered for model 'tiny-gone'" in error["message"]
    [record] = httpx.get(f"{app}/v1/adapters", timeout=30).json()["data"]
    assert record["name"] == "xh-kept" and record["served"] is False
