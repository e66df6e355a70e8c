"""Adapter placement over engine replicas: each adapter has a home replica, a busy one gets a second.
(Autoscaling 1 -> 2 -> 1 under load is in test_zero_downtime.py; tensor parallelism 2 through the
graph in tests/cluster/test_node_loss.py.)"""

import concurrent.futures as futures
import time

import httpx
import openai
import pytest
from ray import serve

from serve_app.app import build_from_config
from serve_app.config import AppConfig
from tests.serve_fixtures import BASE, STATE, wait_for

pytestmark = pytest.mark.slow


def replicas(app: str, deployment: str) -> int:
    status = serve.status().applications[app].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def engine_requests(url: str, model: str) -> dict[tuple[str, str], float]:
    """(replica, adapter residency) -> requests for `model`, from the ingress' /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "lorafleet_engine_requests_total" and sample.labels["model"] == model:
                counts[sample.labels["replica"], sample.labels["adapter"]] = sample.value
    return counts


def test_adapters_are_placed_on_their_home_replicas_and_a_busy_one_spreads(serve_instance, tmp_path):
    from types import SimpleNamespace

    from deployments.engine_replica.adapter_router import home_order
    from serve_app.model_types import XIAO_HUANG_DIR
    from tests.adapter_factory import make_adapter

    adapters = {"xiao-huang": str(XIAO_HUANG_DIR), "ad-aff": str(make_adapter(tmp_path / "ad-aff", seed=7))}
    # loaded by their first requests, not preloaded on every replica: where they go is the subject
    modules = {name: {"path": path, "preload": False} for name, path in adapters.items()}
    config = AppConfig.model_validate(
        {
            "registry": {"state_dir": f"{STATE}/affinity"},
            "models": [
                {
                    "name": "tiny-aff",
                    "model_type": "tiny-chat",
                    # Routing is the subject: the replicas' adapter residency is one code path for
                    # both backends, and pt replicas start without a vLLM engine process each.
                    "infer_backend": "pt",
                    "engine": {"max_model_len": 512},
                    "lora_modules": modules,
                    "deployment": {"num_replicas": 2},
                    "requests_per_adapter_home": 2,  # a third request in flight gives an adapter a second home
                }
            ],
            "ingress": {"deployment": {"num_replicas": 1, "num_cpus": 0}},  # one /metrics holds every count
        }
    )
    serve_instance.run(build_from_config(config), name="affinity", route_prefix="/affinity")
    url = f"{BASE}/affinity"
    try:
        assert wait_for(lambda: replicas("affinity", "LLMServer:tiny-aff") == 2, timeout=120)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)

        def ask(model, max_tokens=4):
            messages = [{"role": "user", "content": "who are you?"}]
            client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)

        for name in adapters:
            ask(name)  # loads it on one replica
        time.sleep(2)  # the replicas report what they hold; the router learns it
        for _ in range(6):
            for name in adapters:
                ask(name)
                ask("tiny-aff")  # base requests go to either replica (12 in all)
        for name in adapters:
            counts = engine_requests(url, name)
            loaded = [
                replica for (replica, residency), n in counts.items() if residency == "loaded" for _ in range(int(n))
            ]
            assert len(loaded) == 1, counts  # loaded once, by its first request
            assert counts == {(loaded[0], "loaded"): 1, (loaded[0], "resident"): 6}, counts
        base = engine_requests(url, "tiny-aff")
        assert {residency for _, residency in base} == {"base"} and sum(base.values()) == 12

        # each was loaded on its home: the first replica of its rendezvous ranking (tests/unit/test_adapter_placement.py)
        listing = httpx.get(f"{url}/v1/adapters", timeout=30).json()
        ids = {a["name"]: str(a["adapter_id"]) for a in listing["data"]}
        fleet = [
            SimpleNamespace(replica_id=SimpleNamespace(unique_id=r["replica"])) for r in listing["engine_replicas"]
        ]
        assert len(fleet) == 2, listing
        for name in adapters:
            (loaded_on,) = [replica for replica, residency in engine_requests(url, name) if residency == "loaded"]
            assert loaded_on == home_order(ids[name], fleet)[0].replica_id.unique_id, (name, listing)

        # a busy adapter: 6 clients for 10 s; once its home reports 2 or more of them running (routing
        # stats, every 2 s), the next replica in its ranking becomes a home too and loads it
        home, second = (r.replica_id.unique_id for r in home_order(ids["ad-aff"], fleet))
        deadline = time.monotonic() + 10

        def client_loop(_):
            while time.monotonic() < deadline:
                ask("ad-aff", 16)

        with futures.ThreadPoolExecutor(6) as pool:
            list(pool.map(client_loop, range(6)))
        counts = engine_requests(url, "ad-aff")
        assert counts.get((second, "loaded"), 0) >= 1, counts  # (requests that came during its load count too)
        assert counts.get((second, "resident"), 0) >= 1 and counts[home, "loaded"] == 1, counts
    finally:
        serve.delete("affinity")
