"""Failures under load: an engine replica killed mid-stream, the registry killed mid-registration."""

import concurrent.futures as futures
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import ray
from ray import serve

from serve_app.app import build_from_config
from serve_app.config import AppConfig
from serve_app.model_types import XIAO_HUANG_DIR
from tests.serve_fixtures import BASE, FAST_START, STATE

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


def eventually(call, timeout: float):
    """The first result of `call` that does not raise, within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.fixture(scope="module")
def failing_app(serve_instance):
    config = AppConfig.model_validate(
        {
            "registry": {"state_dir": f"{STATE}/failing", "allowed_roots": [str(XIAO_HUANG_DIR.parent)]},
            "models": [
                {
                    "name": "tiny-fail",
                    "model_type": "tiny-chat",
                    "engine": FAST_START,
                    "lora_modules": {"xh-fail": str(XIAO_HUANG_DIR)},
                    "deployment": {"num_replicas": 1},
                }
            ],
        }
    )
    serve_instance.run(build_from_config(config), name="failing", route_prefix="/failing")
    yield f"{BASE}/failing"
    serve.delete("failing")


def test_engine_replica_killed_during_load(failing_app):
    client = openai.OpenAI(base_url=f"{failing_app}/v1", api_key="none", max_retries=0, timeout=60)
    streaming = threading.Barrier(5)
    outcomes = []

    def stream_one(i):
        chunks = client.chat.completions.create(
            model="tiny-fail" if i % 2 else "xh-fail",
            messages=[{"role": "user", "content": f"count {i}"}],
            max_tokens=1000,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        try:
            first = True
            for _ in chunks:
                if first:
                    first = False
                    streaming.wait(timeout=30)
            outcomes.append("completed")
        except openai.APIError as e:  # the error event the ingress sends in-band
            assert "Traceback" not in str(e)
            outcomes.append(f"error: {e}")

    with futures.ThreadPoolExecutor(4) as pool:
        running = [pool.submit(stream_one, i) for i in range(4)]
        streaming.wait(timeout=60)
        kill_actor("LLMServer:tiny-fail")
        for f in running:
            f.result(timeout=60)  # no hang
    assert len(outcomes) == 4 and any(o.startswith("error") for o in outcomes), outcomes

    # Serve replaces the replica by itself; the base model and the adapter answer again.
    def answer(model):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "who are you?"}], max_tokens=16
        )
        assert r.choices[0].message.content
        return r.choices[0].message.content

    base = eventually(lambda: answer("tiny-fail"), timeout=180)
    assert eventually(lambda: answer("xh-fail"), timeout=60) != base


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
