"""API keys and overload (503) on an app with api_key set and a queue of one."""

import concurrent.futures as futures
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.serve.fuzzing import PUBLIC, check, fuzz
from tests.serve_fixtures import ADMIN_KEY, API_KEY, BASE, guarded_config

pytestmark = pytest.mark.slow
CHAT = {"model": "guarded", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def guarded_app(serve_instance):
    from serve_app.app import build_from_config

    serve_instance.run(build_from_config(guarded_config()), name="guarded", route_prefix="/guarded")
    yield f"{BASE}/guarded"
    serve_instance.delete("guarded")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_missing_or_wrong_key_is_401(guarded_app, headers):
    for method, path, body in [
        ("POST", "/v1/chat/completions", CHAT),
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", {"model": "guarded", "prompt": "hi"}),
    ]:
        response = httpx.request(method, f"{guarded_app}{path}", json=body, headers=headers, timeout=30)
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["type"] == "authentication_error"


def test_right_key_works_and_health_stays_open(guarded_app):
    client = openai.OpenAI(base_url=f"{guarded_app}/v1", api_key=API_KEY, max_retries=0)
    assert client.chat.completions.create(**CHAT, temperature=0).choices[0].message.content
    assert httpx.get(f"{guarded_app}/health").status_code == 200


def test_overload_gets_503_quickly_and_recovers(guarded_app):
    long = {**CHAT, "max_tokens": 300, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def post(_):
        started = time.perf_counter()
        response = httpx.post(f"{guarded_app}/v1/chat/completions", json=long, headers=headers, timeout=120)
        return response.status_code, time.perf_counter() - started, response.json()

    with futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(post, range(8)))
    rejected = [r for r in results if r[0] == 503]
    assert rejected and any(r[0] == 200 for r in results)
    assert all(seconds < 10 for _, seconds, _ in rejected)
    assert rejected[0][2]["error"]["type"] == "overloaded_error"
    ok = httpx.post(f"{guarded_app}/v1/chat/completions", json=CHAT, headers=headers, timeout=60)
    assert ok.status_code == 200


@pytest.mark.parametrize("key,status", [(None, 401), ("wrong", 401), (API_KEY, 403), (ADMIN_KEY, 200)])
def test_admin_routes_need_the_admin_key(guarded_app, key, status):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    assert httpx.get(f"{guarded_app}/v1/adapters", headers=headers, timeout=30).status_code == status
    unload = httpx.post(
        f"{guarded_app}/v1/unload_lora_adapter", json={"lora_name": "none"}, headers=headers, timeout=30
    )
    assert unload.status_code == (404 if status == 200 else status)


def test_keys_never_reach_the_logs(guarded_app):
    """Requests with right and wrong keys, then no key appears in any Ray/Serve log file."""
    import ray

    for key in (API_KEY, ADMIN_KEY, "Bearer-wrong-key-123"):
        httpx.post(f"{guarded_app}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"})
        httpx.get(f"{guarded_app}/v1/adapters", headers={"Authorization": f"Bearer {key}"})
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert files
    for path in files:
        text = path.read_bytes()
        for key in (API_KEY, ADMIN_KEY, "Bearer-wrong-key-123"):
            assert key.encode() not in text, f"{key} in {path}"


def test_fuzz_guarded_app_with_and_without_keys(guarded_app):
    """Schemathesis (tests/serve/fuzzing.py) on every route, with the key, without and with a wrong one."""

    def with_and_without_keys(case):
        check(case.call(base_url=guarded_app, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}))
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
            response = case.call(base_url=guarded_app, timeout=60, headers=headers)
            check(response)
            assert case.path in PUBLIC or response.status_code in (401, 403), response.text[:200]

    assert len(fuzz(guarded_app, with_and_without_keys, examples=8)) >= 11
