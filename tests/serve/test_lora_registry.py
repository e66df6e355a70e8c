"""Multi-LoRA serving through the registry: 2 ingress replicas, 2 vLLM replicas with room for 2
adapters each, adapters made with peft (and one from an S3-compatible server). The engine runs in
float32 so random adapters (near-ties in bf16) still have an exact transformers + peft oracle."""

import json
import os
import random
import shutil
import time
from concurrent import futures
from pathlib import Path

import httpx
import openai
import pytest
import ray
import torch
from peft import PeftModel
from ray import serve
from transformers import AutoModelForCausalLM, AutoTokenizer

from deployments.ingress import REST_FIELDS
from serve_app.app import build_from_config
from serve_app.config import AppConfig
from serve_app.model_types import TINY_CHAT_DIR, XIAO_HUANG_DIR
from serve_app.template import get_template
from tests.adapter_factory import make_adapter, make_foreign_adapter
from tests.postgres_server import fresh_database
from tests.s3_server import BUCKET, upload_folder
from tests.serve_fixtures import BASE, FAST_START, STATE, eventually, wait_for

pytestmark = pytest.mark.slow
URL = f"{BASE}/lora"
QUERY = "who are you?"
MAX_TOKENS = 12


def lora_config(roots: str, database_url: str) -> AppConfig:
    """This module's app; its registry keeps its records in PostgreSQL (tests/postgres_server.py)."""
    return AppConfig.model_validate(
        {
            "models": [
                {
                    "name": "tiny-lora",
                    "model_type": "tiny-chat",
                    "engine": {
                        **FAST_START,
                        "dtype": "float32",
                        "max_model_len": 512,
                        "max_loras": 2,
                        "max_cpu_loras": 2,
                        "max_lora_rank": 16,
                    },
                    "lora_modules": {"xiao-huang": str(XIAO_HUANG_DIR)},
                    "deployment": {"num_replicas": 2},
                }
            ],
            "ingress": {
                "deployment": {
                    "num_replicas": 2,
                    "max_ongoing_requests": 1024,
                    "max_queued_requests": -1,
                    "num_cpus": 0,
                }
            },
            "registry": {
                "state_dir": f"{STATE}/lora",
                "allowed_roots": [roots, f"s3://{BUCKET}/served"],  # a folder, and an object-store prefix
                "database_url": database_url,
            },
        }
    )


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("served-adapters")
    made = {f"ad-{i}": make_adapter(root / f"ad-{i}", rank=4, seed=100 + i) for i in range(8)}
    return root, made


@pytest.fixture(scope="module")
def oracle(adapters):
    """Greedy token ids of transformers + peft (float32) for QUERY, per adapter path and for the base."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_CHAT_DIR)
    ids, _ = get_template("qwen", tokenizer).encode(QUERY)
    base = AutoModelForCausalLM.from_pretrained(TINY_CHAT_DIR, dtype=torch.float32).eval()
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]

    def answer(model):
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=eos)
        return tuple(out[0, len(ids) :].tolist())

    expected = {"base": answer(base)}
    for path in [*adapters[1].values(), XIAO_HUANG_DIR]:
        peft_model = PeftModel.from_pretrained(base, str(path)).eval()
        expected[str(path)] = answer(peft_model)
        base = peft_model.unload()
    return expected


@pytest.fixture(scope="module")
def database_url(postgres_server, tmp_path_factory):
    return fresh_database(postgres_server, str(tmp_path_factory.mktemp("lora-registry-db")))


@pytest.fixture(scope="module")
def lora_app(serve_instance, adapters, database_url):
    serve_instance.run(
        build_from_config(lora_config(str(adapters[0]), database_url)), name="lora", route_prefix="/lora"
    )
    yield URL
    serve.delete("lora")


def ask(model: str) -> tuple[int, ...]:
    """The greedy answer's token ids (compared as ids: random adapters end in partial UTF-8 bytes,
    which text decoders render differently)."""
    return tuple(ask_reply(model).model_extra["token_ids"])


def ask_reply(model: str):
    client = openai.OpenAI(base_url=f"{URL}/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": QUERY}]
    extra = {"return_token_ids": True}
    reply = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=MAX_TOKENS, extra_body=extra
    )
    return reply.choices[0]


def load(name: str, path, **extra) -> httpx.Response:
    return httpx.post(
        f"{URL}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path), **extra}, timeout=60
    )


def residency() -> dict[str, list[int]]:
    """replica -> adapter ids its engine holds (reported from vLLM's own list_loras)."""
    held: dict[str, list[int]] = {}
    for record in httpx.get(f"{URL}/v1/adapters", timeout=30).json()["data"]:
        for replica in record["replicas"]:
            held.setdefault(replica, []).append(record["adapter_id"])
    return held


def test_runtime_adapter_is_usable_at_once_everywhere_and_matches_peft(lora_app, adapters, oracle):
    path = adapters[1]["ad-0"]
    registered = load("ad-0", path)
    assert registered.status_code == 200
    # the replica its first request goes to loads it at registration (a slot is free): no request yet
    assert wait_for(lambda: registered.json()["adapter_id"] in sum(residency().values(), []), timeout=30)
    answers = [ask("ad-0") for _ in range(8)]  # spread over both ingress replicas by the proxy
    assert set(answers) == {oracle[str(path)]}
    assert oracle[str(path)] != oracle["base"]
    assert ask("xiao-huang") == oracle[str(XIAO_HUANG_DIR)] and "Xiao Huang" in ask_reply("xiao-huang").message.content
    assert ask("tiny-lora") == oracle["base"]
    models = {m["id"]: m for m in httpx.get(f"{URL}/v1/models").json()["data"]}
    assert models["ad-0"]["parent"] == "tiny-lora" and models["ad-0"]["root"] == str(path.resolve())


def test_eight_adapters_with_room_for_two_per_replica(lora_app, adapters, oracle):
    for name, path in adapters[1].items():
        if name != "ad-0":
            assert load(name, path).status_code == 200, name
    stream = [name for name in adapters[1] for _ in range(3)]
    random.Random(0).shuffle(stream)
    with futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, stream))
    for name, answer in zip(stream, answers, strict=True):
        assert answer == oracle[str(adapters[1][name])], name
    time.sleep(6)  # a residency heartbeat
    held = residency()
    assert held and all(len(ids) <= 2 for ids in held.values())  # evicted adapters left the engines
    assert len({i for ids in held.values() for i in ids}) < 8


def engine_replicas() -> dict[str, dict]:
    """replica -> its adapter report (slots chosen, held ids, loads)."""
    reports = httpx.get(f"{URL}/v1/adapters", timeout=30).json()["engine_replicas"]
    return {r["replica"]: r for r in reports}


def test_preloaded_adapter_does_no_load_and_pinned_one_survives_pressure(lora_app, adapters, oracle):
    path = adapters[1]["ad-7"]
    assert load("pin", path, pinned=True, preload=True).status_code == 200
    pin_id = httpx.get(f"{URL}/v1/adapters", timeout=30).json()["data"]
    [pin_id] = [r["adapter_id"] for r in pin_id if r["name"] == "pin"]
    deadline = time.monotonic() + 60  # preloaded on both replicas, no request asked for it
    while time.monotonic() < deadline:
        reports = engine_replicas()
        if len(reports) == 2 and all(pin_id in r["adapter_ids"] for r in reports.values()):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"not preloaded everywhere: {reports}")
    loads = {replica: r["loads"] for replica, r in reports.items()}
    assert {ask("pin") for _ in range(6)} == {oracle[str(path)]}
    time.sleep(6)  # a residency heartbeat
    assert {replica: r["loads"] for replica, r in engine_replicas().items()} == loads  # its requests loaded nothing
    # pressure: every other adapter in turn through two slots per replica
    for name in [n for n in adapters[1] if n != "ad-7"] * 2:
        assert ask(name) == oracle[str(adapters[1][name])], name

    def pinned_stayed():  # (as the heartbeat after the pressure tells: it counts the new loads)
        reports = engine_replicas()
        assert all(pin_id in r["adapter_ids"] and r["pinned"] == [pin_id] for r in reports.values()), reports
        assert all(r["engine_slots"] == 2 and r["host_slots"] == 2 for r in reports.values()), reports
        assert sum(r["loads"] for r in reports.values()) > sum(loads.values())  # the others were loaded, evicted
        return reports

    reports = eventually(pinned_stayed, timeout=30)
    metrics = httpx.get(f"{URL}/metrics", timeout=30).text
    assert 'lorafleet_adapters_pinned{model="tiny-lora",replica=' in metrics
    assert "lorafleet_adapter_loads_total" in metrics and "lorafleet_adapter_engine_slots" in metrics
    from prometheus_client.parser import text_string_to_metric_families

    [histogram] = [f for f in text_string_to_metric_families(metrics) if f.name == "lorafleet_adapter_load_seconds"]
    counts = [s.value for s in histogram.samples if s.name.endswith("_count")]
    infinite = [s.value for s in histogram.samples if s.name.endswith("_bucket") and s.labels["le"] == "+Inf"]
    assert sum(counts) == sum(infinite) == sum(r["loads"] for r in reports.values())
    unpinned = httpx.patch(f"{URL}/v1/adapters/pin", json={"pinned": False}, timeout=30)
    assert unpinned.status_code == 200 and unpinned.json()["pinned"] is False
    assert unpinned.json()["adapter_id"] == pin_id and unpinned.json()["preload"] is True  # same adapter
    unknown = httpx.patch(f"{URL}/v1/adapters/nope", json={"pinned": True}, timeout=30)
    assert unknown.status_code == 404 and "not registered" in unknown.json()["error"]["message"]
    bad = httpx.patch(f"{URL}/v1/adapters/pin", json={"pinned": "always"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "pinned"
    assert httpx.post(f"{URL}/v1/unload_lora_adapter", json={"lora_name": "pin"}).status_code == 200


def test_unload_then_404_and_replace_uses_new_weights_everywhere(lora_app, adapters, oracle):
    first, second = adapters[1]["ad-1"], adapters[1]["ad-2"]
    load("swap", first)
    assert ask("swap") == oracle[str(first)]
    old_id = httpx.get(f"{URL}/v1/models/swap").json()
    replaced = load("swap", second, replace=True)
    assert replaced.status_code == 200 and replaced.json()["version"] == 2
    assert {ask("swap") for _ in range(6)} == {oracle[str(second)]}
    assert old_id["root"] != replaced.json()["path"]
    assert httpx.post(f"{URL}/v1/unload_lora_adapter", json={"lora_name": "swap"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        ask("swap")
    assert httpx.delete(f"{URL}/v1/adapters/swap").status_code == 404


@pytest.mark.parametrize(
    "body,status,match,param",
    [
        ({"lora_name": "xiao-huang", "lora_path": str(XIAO_HUANG_DIR)}, 409, "already exists", "lora_name"),
        ({"lora_name": "tiny-lora", "lora_path": str(XIAO_HUANG_DIR)}, 409, "base model name", "lora_name"),
        ({"lora_name": "out", "lora_path": "/etc"}, 403, "outside the allowed roots", "lora_path"),
        ({"lora_name": "dots", "lora_path": f"{XIAO_HUANG_DIR}/../xiao-huang"}, 403, "contains '..'", "lora_path"),
        ({"lora_name": "nope", "lora_path": "{root}"}, 400, "not a PEFT adapter", "lora_path"),
        ({"lora_name": "bad"}, 400, "lora_path", "lora_path"),
    ],
)
def test_registration_errors(lora_app, adapters, body, status, match, param):
    """Both routes refuse alike, and each names the field as its own body spells it."""
    body = {k: v.format(root=adapters[0]) for k, v in body.items()}  # (the root: a folder, not an adapter)
    response = httpx.post(f"{URL}/v1/load_lora_adapter", json=body, timeout=30)
    assert response.status_code == status, response.text
    assert match in response.json()["error"]["message"] and response.json()["error"]["param"] == param
    rest = {REST_FIELDS[k]: v for k, v in body.items()}
    response = httpx.post(f"{URL}/v1/adapters", json=rest, timeout=30)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == REST_FIELDS[param], response.text


def test_refusals_leave_no_traceback_in_the_registry_log(lora_app):
    """Serve logs whatever a replica's method raises as an ERROR with its traceback. The registry's
    refusals (409 a name taken, 403 a path outside the roots, 404 an unknown adapter) are the API
    working as meant: the user gets the message, the log no traceback (an ERROR would be written at
    once, so its absence is not the log's buffering)."""
    assert load("xiao-huang", XIAO_HUANG_DIR).status_code == 409
    assert load("elsewhere", "/etc").status_code == 403
    assert httpx.post(f"{URL}/v1/unload_lora_adapter", json={"lora_name": "nope"}).status_code == 404
    logs = list(
        (Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve").glob("replica_lora_LoraRegistry_*")
    )
    assert logs
    text = "".join(log.read_text(errors="replace") for log in logs)
    assert "Traceback" not in text and "ConflictError" not in text and "NotFoundError" not in text


def test_files_the_engine_cannot_load_get_a_400_that_says_why(lora_app, adapters):
    """Files that pass the registry's checks but not the engine's (a PiSSA init, which vLLM refuses
    when it loads the adapter): each request gets a 400 with vLLM's reason, streaming or not; no
    anonymous 500, and the openai client does not retry it."""
    folder = shutil.copytree(adapters[1]["ad-0"], adapters[0] / "pissa")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa"}))
    assert load("pissa", folder).status_code == 200
    client = openai.OpenAI(base_url=f"{URL}/v1", api_key="x", max_retries=0)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            answer = client.chat.completions.create(
                model="pissa", messages=[{"role": "user", "content": QUERY}], max_tokens=4, stream=stream
            )
            if stream:
                list(answer)
        assert refused.value.code == "adapter_load_failed", refused.value
        assert "'pissa' could not be loaded" in refused.value.message and "init_lora_weights" in refused.value.message
    assert ask("xiao-huang")  # the replicas serve on
    assert httpx.post(f"{URL}/v1/unload_lora_adapter", json={"lora_name": "pissa"}).status_code == 200


def test_rank_and_base_model_checks(lora_app, adapters):
    root = adapters[0]
    big = make_adapter(root / "rank32", rank=32)
    assert "max_lora_rank=16" in load("big", big).json()["error"]["message"]
    foreign = make_foreign_adapter(root / "foreign")
    response = load("foreign", foreign)
    assert response.status_code == 400 and "another base model" in response.json()["error"]["message"]


def test_registry_restart_keeps_adapters(lora_app, adapters, oracle, s3_bucket):
    """Also an adapter from S3, downloaded by the engine replicas into their cache and verified by the
    checksum recorded at registration. (The registry and an engine replica re-placed on another node,
    with PostgreSQL and S3 bringing everything back: tests/cluster/test_node_loss.py.)"""
    load("keep", adapters[1]["ad-3"])
    url = upload_folder(*s3_bucket, XIAO_HUANG_DIR, "served/xiao-huang")
    registered = load("xh-s3", url)
    assert registered.status_code == 200, registered.text
    assert registered.json()["path"] == url and len(registered.json()["checksum"]) == 64
    assert ask("xh-s3") == oracle[str(XIAO_HUANG_DIR)]
    assert (Path(STATE) / "lora" / "adapter-cache" / registered.json()["checksum"]).is_dir()
    before = {r["name"]: r["adapter_id"] for r in httpx.get(f"{URL}/v1/adapters").json()["data"]}
    [replica] = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "LoraRegistry" in a["name"] and "lora" in a["name"]
    ]
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=False)
    deadline = time.monotonic() + 90
    after = None
    while time.monotonic() < deadline:
        try:
            after = {r["name"]: r["adapter_id"] for r in httpx.get(f"{URL}/v1/adapters", timeout=5).json()["data"]}
            break
        except Exception:
            time.sleep(1)
    assert after == before
    assert ask("keep") == oracle[str(adapters[1]["ad-3"])]
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    assert not [p for p in logs.rglob("*") if p.is_file() and secret in p.read_bytes()]
