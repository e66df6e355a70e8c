"""API keys and overload (503) on an app with api_key set and a queue of one."""

import concurrent.futures as futures
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from serve_app.model_types import XIAO_HUANG_DIR
from tests.serve.fuzzing import PUBLIC, check, fuzz
from tests.serve_fixtures import ADMIN_KEY, API_KEY, BASE, STATE, guarded_config

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
    for key in (API_KEY, ADMIN_KEY, "Bearer-wrong-key-123"):
        httpx.post(f"{guarded_app}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"})
        httpx.get(f"{guarded_app}/v1/adapters", headers={"Authorization": f"Bearer {key}"})
    _assert_not_in_logs(API_KEY, ADMIN_KEY, "Bearer-wrong-key-123")


def _assert_not_in_logs(*keys: str) -> None:
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert files
    for path in files:
        text = path.read_bytes()
        for key in keys:
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


def test_tenant_keys_see_and_use_only_their_own_and_are_limited(guarded_app):
    """Keys created through the admin API: each tenant sees the base model and its own adapters
    (another's is a 404 like a name that does not exist), registers only under its prefix, meets
    its requests/minute and tokens/minute with 429 + Retry-After, is counted per tenant on /metrics (which then needs
    the admin key), and stops working when revoked. Runs after the tests above: keys stay on."""
    admin = httpx.Client(base_url=guarded_app, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)

    def new_key(name, **spec):
        response = admin.post("/v1/keys", json={"name": name, **spec})
        assert response.status_code == 201, response.text
        return response.json()["key"]

    acme = new_key("acme-1", tenant="acme", can_register=True)
    globex = new_key("globex", requests_per_minute=2)
    assert admin.post("/v1/keys", json={"name": "globex"}).status_code == 409
    as_acme = httpx.Client(base_url=guarded_app, headers={"Authorization": f"Bearer {acme}"}, timeout=60)

    own = Path(STATE) / "guarded" / "adapters" / "acme" / "bot"  # a tenant registers from its own folder
    shutil.copytree(XIAO_HUANG_DIR, own)
    registered = as_acme.post("/v1/load_lora_adapter", json={"lora_name": "acme:bot", "lora_path": str(own)})
    assert registered.status_code == 200, registered.text
    elsewhere = as_acme.post("/v1/adapters", json={"name": "acme:x", "path": str(XIAO_HUANG_DIR)})
    assert elsewhere.status_code == 403 and elsewhere.json()["error"]["code"] == "path_not_allowed"
    assert "this tenant's folders" in elsewhere.json()["error"]["message"]  # not the operator's --adapter_roots
    # slots on every replica are the admin's, and so is clearing them (a replace with pinned false)
    for flags in ({"pinned": True}, {"preload": True}, {"force": True}, {"pinned": False, "replace": True}):
        flagged = as_acme.post("/v1/adapters", json={"name": "acme:y", "path": str(own), **flags})
        assert flagged.status_code == 403, flagged.text
    assert as_acme.patch("/v1/adapters/acme:bot", json={"pinned": True}).status_code == 403
    outside = as_acme.post("/v1/adapters", json={"name": "globex:bot", "path": str(own)})
    assert outside.status_code == 403 and outside.json()["error"]["code"] == "adapter_prefix_required"
    by_globex = httpx.post(
        f"{guarded_app}/v1/adapters",
        json={"name": "globex:x", "path": str(XIAO_HUANG_DIR)},
        headers={"Authorization": f"Bearer {globex}"},
    )
    assert by_globex.status_code == 403  # this key may not register

    def models(secret):
        client = openai.OpenAI(base_url=f"{guarded_app}/v1", api_key=secret, max_retries=0)
        return sorted(m.id for m in client.models.list().data), client

    seen, acme_client = models(acme)
    assert seen == ["acme:bot", "guarded"]
    seen, globex_client = models(globex)
    assert seen == ["guarded"]
    assert models(API_KEY)[0] == ["acme:bot", "guarded", "xiao-huang"]

    ask = {"messages": [{"role": "user", "content": "你是谁"}], "max_tokens": 8, "temperature": 0}
    answer = acme_client.chat.completions.create(model="acme:bot", **ask).choices[0].message.content
    same_weights = models(API_KEY)[1].chat.completions.create(model="xiao-huang", **ask)
    assert answer == same_weights.choices[0].message.content  # acme:bot is xiao-huang's files
    with pytest.raises(openai.NotFoundError) as hidden:
        globex_client.chat.completions.create(model="acme:bot", **ask)
    with pytest.raises(openai.NotFoundError) as missing:
        globex_client.chat.completions.create(model="acme:none", **ask)
    assert str(hidden.value).replace("acme:bot", "X") == str(missing.value).replace("acme:none", "X")
    with pytest.raises(openai.BadRequestError):  # refused before admission: not one of its 2 a minute
        globex_client.chat.completions.create(model="guarded", n=2, **ask)
    for _ in range(2):
        assert globex_client.chat.completions.create(model="guarded", **ask).choices[0].message.content
    with pytest.raises(openai.RateLimitError) as limited:  # its third request this minute
        globex_client.chat.completions.create(model="guarded", **ask)
    assert 1 <= int(limited.value.response.headers["Retry-After"]) <= 30
    assert limited.value.body["code"] == "rate_limit_exceeded"
    # tokens/minute: a request sets aside its max_tokens when admitted, and settles what it used
    _, initech_client = models(new_key("initech", tokens_per_minute=100))
    long = {**ask, "max_tokens": 60, "extra_body": {"ignore_eos": True}}
    assert initech_client.chat.completions.create(model="guarded", **long).usage.completion_tokens == 60
    with pytest.raises(openai.RateLimitError) as over:  # 60 more would pass 100 this minute
        initech_client.chat.completions.create(model="guarded", **long)
    assert over.value.body["type"] == "tokens" and int(over.value.response.headers["Retry-After"]) >= 10

    # models patterns: an adapter is listed and used only together with its base; list and use agree
    narrow = new_key("narrow", models=["xiao-huang"], can_register=True)  # the adapter, not its base
    seen, narrow_client = models(narrow)
    assert seen == []
    with pytest.raises(openai.NotFoundError):
        narrow_client.chat.completions.create(model="xiao-huang", **ask)
    nowhere = httpx.post(
        f"{guarded_app}/v1/adapters",
        json={"name": "narrow:x", "path": str(own)},
        headers={"Authorization": f"Bearer {narrow}"},
    )
    assert nowhere.status_code == 403 and "no base model" in nowhere.json()["error"]["message"], nowhere.text
    seen, wide_client = models(new_key("wide", models=["guarded", "xiao-huang"]))
    assert seen == ["guarded", "xiao-huang"]
    wide_answer = wide_client.chat.completions.create(model="xiao-huang", **ask).choices[0].message.content
    assert wide_answer == same_weights.choices[0].message.content

    deleted = as_acme.delete("/v1/adapters/xiao-huang")  # not its own: as if it did not exist
    assert deleted.status_code == 404
    assert as_acme.get("/v1/adapters").status_code == 403
    assert httpx.get(f"{guarded_app}/metrics").status_code == 401
    metrics = admin.get("/metrics").text
    assert 'lorafleet_key_requests_total{key="acme-1",status="200",tenant="acme"}' in metrics
    assert 'lorafleet_key_rate_limited_total{key="globex",limit="requests",tenant="globex"} 1.0' in metrics
    assert 'lorafleet_key_rate_limited_total{key="initech",limit="tokens",tenant="initech"} 1.0' in metrics
    assert 'lorafleet_key_tokens_total{key="acme-1",kind="completion",tenant="acme"}' in metrics

    listed = {k["name"]: k for k in admin.get("/v1/keys").json()["data"]}
    assert listed["acme-1"]["key_hint"] == acme[:8] + "..." and "key" not in listed["acme-1"]
    assert admin.delete("/v1/keys/acme-1").json()["revoked"] is True
    with pytest.raises(openai.AuthenticationError):
        acme_client.models.list()
    _assert_not_in_logs(acme, globex)


def test_readme_keys_commands(guarded_app):
    """The README's `lorafleet keys` block, run as written (the app's address added)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme, flags=re.S) if "lorafleet keys create" in b)
    commands = [shlex.split(line) for line in block.splitlines() if line.startswith("lorafleet keys")]
    assert [c[2] for c in commands] == ["create", "list", "revoke"]
    env = {**os.environ, "LORAFLEET_ADMIN_API_KEY": ADMIN_KEY}
    lorafleet = str(Path(sys.executable).parent / "lorafleet")
    printed = []
    for command in commands:
        done = subprocess.run(
            [lorafleet, *command[1:], "--url", guarded_app], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        printed.append(done.stdout)
    secret = printed[0].splitlines()[-1]
    assert secret.startswith("lf-")
    assert "acme-prod" in printed[1] and secret[:8] in printed[1] and secret not in printed[1]
    assert "revoked key 'acme-prod'" in printed[2]
    refused = subprocess.run(
        [lorafleet, "keys", "list", "--url", guarded_app], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "401" in refused.stderr and "Traceback" not in refused.stderr
