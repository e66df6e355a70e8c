"""The raylet of a two-node Ray cluster's worker node is SIGKILLed under streaming load: nothing hangs,
Serve re-places the lost replicas (a tensor-parallel-2 vLLM engine replica and the registry's) on the head,
and no adapter is lost. Before the loss, the TP-2 replica's answers through the whole graph equal
transformers' (+ peft's) token for token.

The cluster is the test's own (head + a worker started with `ray start --address`, as Ray's own
multi-node tests do on one machine), because killing a node must not touch the suite's shared
cluster. So it runs before any other test starts Ray, and ends with `ray stop --force`
(tests/conftest.py orders it with the other tests that stop Ray).

Placement: the engine replica and the registry's replica ask for one unit each of a custom
resource, `lf_slot`, that both nodes offer. While the app starts, an actor of the test holds the
head's units, so both replicas land on the worker; it is ended before the worker is killed, so the
head can take them back. The ingress and renderer ask for `lf_head`, which only the head has: an
in-flight stream can end with an OpenAI-shaped error only where its ingress survives.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from serve_app.model_types import XIAO_HUANG_DIR
from tests.postgres_server import fresh_database
from tests.s3_server import upload_folder
from tests.serve_fixtures import FAST_START, QUIET_RAY, eventually, free_port

pytestmark = [pytest.mark.slow, pytest.mark.stops_ray]

RAY = str(Path(sys.executable).parent / "ray")
# How fast the cluster notices a dead node: Ray's defaults (a health check every 3 s, 5 failures)
# take about 15 s; here 1 s and 3 failures, so the test waits less. The outcome is the same.
QUERIES = ["浙江的省会在哪？", "Tell me a story.", "who are you?"]
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def raylets() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "raylet"}


def ray_start(*args: str) -> None:
    env = os.environ | QUIET_RAY | FAST_NODE_DEATH | {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
    cmd = [RAY, "start", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args]
    started = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]


def lose_node(raylet: int) -> list[psutil.Process]:
    """SIGKILL the node's raylet; returns the processes it had started (replicas, vLLM's engine
    processes), which must end by themselves."""
    node = psutil.Process(raylet)
    started = node.children(recursive=True)
    node.kill()
    return started


def app_config(state_dir: Path, database_url: str, s3_root: str) -> dict:
    on_head = {"resources": {"lf_head": 0.01}}
    on_a_slot = {"resources": {"lf_slot": 1}}
    return {
        "models": [
            {
                "name": "tiny-nl",
                "model_type": "tiny-chat",
                # Tensor parallelism 2: its two workers' bundles are placed together, on the worker
                # and then on the head. (The suite's only TP-2 engine: its answers equal
                # transformers' below, which covers what an offline TP-2 engine would.)
                "engine": {**FAST_START, "tensor_parallel_size": 2, "max_model_len": 512, "enable_lora": True},
                "deployment": {"num_replicas": 1, "ray_actor_options": on_a_slot},
            }
        ],
        "ingress": {"deployment": {"num_replicas": 1, "num_cpus": 0, "ray_actor_options": on_head}},
        "renderer": {"deployment": {"num_replicas": 1, "num_cpus": 0, "ray_actor_options": on_head}},
        "registry": {
            "state_dir": str(state_dir),
            "database_url": database_url,  # what saves the adapters when the registry's node goes
            "allowed_roots": [s3_root],
            "ray_actor_options": on_a_slot,
        },
    }


def raylet_of(app: str, deployment: str) -> int:
    """The raylet (so the node) whose worker process runs this deployment's one replica: Ray's
    workers are their raylet's children, titled `ray::ServeReplica:<app>:<deployment>`."""
    (parent,) = {
        p.ppid()
        for p in psutil.process_iter(["cmdline"])
        if (p.info["cmdline"] or [""])[0].startswith(f"ray::ServeReplica:{app}:{deployment}")
    }
    return parent


def hf_greedy_answers(queries: list[str], adapter: Path | None = None, max_tokens: int = 24) -> list[str]:
    """transformers' (+ peft's) greedy answers in bf16: the oracle."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve_app.model_types import TINY_CHAT_DIR
    from serve_app.template import get_template

    tokenizer = AutoTokenizer.from_pretrained(TINY_CHAT_DIR)
    model = AutoModelForCausalLM.from_pretrained(TINY_CHAT_DIR, dtype=torch.bfloat16).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    answers = []
    for query in queries:
        ids, _ = get_template("qwen", tokenizer).encode(query)
        out = model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos
        )
        answers.append(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))
    return answers


def stream_until_cut(client: openai.OpenAI, model: str, streaming: threading.Event) -> str:
    """One long stream; how it ended."""
    try:
        chunks = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "count"}],
            max_tokens=400,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for _ in chunks:
            streaming.set()
    # before its first token: a 503 in OpenAI's shape; after it: the error event sent in-band
    except openai.APIError as e:
        assert "Traceback" not in str(e)
        return f"error: {e}"
    return "completed"


def test_worker_node_lost_under_load(tmp_path, postgres_server, s3_bucket):
    import ray
    from ray import serve

    from serve_app.app import build_from_config
    from serve_app.config import AppConfig
    from serve_app.platform import apply_serve_env

    apply_serve_env()
    port, http_port = free_port(), free_port()
    s3_url = upload_folder(*s3_bucket, XIAO_HUANG_DIR, "node-loss/xiao-huang")
    subprocess.run([RAY, "get-auth-token", "--generate"], check=True, capture_output=True, timeout=60)
    head_slots = '{"lf_head": 1, "lf_slot": 2}'
    ray_start("--head", f"--port={port}", "--num-cpus=4", f"--resources={head_slots}", "--include-dashboard=false")
    try:
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)

        @ray.remote(resources={"lf_slot": 2}, num_cpus=0)
        class HoldSlots:
            def ready(self) -> bool:
                return True

        holder = HoldSlots.remote()  # the head's slots, taken while the worker does not exist yet
        ray.get(holder.ready.remote(), timeout=60)
        (head_raylet,) = raylets()
        ray_start(f"--address=127.0.0.1:{port}", "--num-cpus=2", '--resources={"lf_slot": 2}')
        (worker_raylet,) = raylets() - {head_raylet}

        # One proxy, on the head: both nodes share 127.0.0.1, so a second would find its port taken.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port})
        database_url = fresh_database(postgres_server, "node-loss")
        config = AppConfig.model_validate(app_config(tmp_path / "state", database_url, s3_url.rsplit("/", 1)[0]))
        serve.run(build_from_config(config), name="nl", route_prefix="/")
        for deployment in ("LLMServer:tiny-nl", "LoraRegistry"):
            assert raylet_of("nl", deployment) == worker_raylet, deployment
        assert raylet_of("nl", "Ingress") == head_raylet

        base = f"http://127.0.0.1:{http_port}"
        added = httpx.post(f"{base}/v1/adapters", json={"name": "xh-s3", "path": s3_url}, timeout=120)
        assert added.status_code == 201, added.text
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)

        def answers(model: str) -> list[str]:
            return [
                client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=24
                )
                .choices[0]
                .message.content
                for q in QUERIES
            ]

        # Tensor parallelism 2 through the graph equals transformers (+ peft) token for token.
        before = {"tiny-nl": answers("tiny-nl"), "xh-s3": answers("xh-s3")}
        assert before == {"tiny-nl": hf_greedy_answers(QUERIES), "xh-s3": hf_greedy_answers(QUERIES, XIAO_HUANG_DIR)}
        ids_before = {a["name"]: a["adapter_id"] for a in httpx.get(f"{base}/v1/adapters").json()["data"]}
        ray.kill(holder)  # the head may take the replicas now

        # Four streams in flight, base and adapter; the node goes at the first token.
        streaming = threading.Event()
        with futures.ThreadPoolExecutor(4) as pool:
            running = [pool.submit(stream_until_cut, client, m, streaming) for m in ["tiny-nl", "xh-s3"] * 2]
            assert streaming.wait(timeout=120)
            orphans = lose_node(worker_raylet)  # SIGKILL, as an OOM kill or a crash would
            lost_at = time.monotonic()
            outcomes = [f.result(timeout=90) for f in running]  # no hang
        assert all(o.startswith("error") for o in outcomes), outcomes

        # Serve re-places both replicas on the head by itself. The registry's records come back from
        # PostgreSQL; the engine replica finds no local copy of the adapter and downloads it again.
        shutil.rmtree(config.registry.adapter_cache, ignore_errors=True)
        after = {model: eventually(lambda m=model: answers(m), timeout=300) for model in before}
        print(f"node lost -> base and adapter answer again: {time.monotonic() - lost_at:.0f} s")  # pytest -s
        # What ran on the lost node (replicas, vLLM's engine process and its TP workers) ended by
        # itself on losing its raylet: nothing is left holding memory or devices.
        left = [p.pid for p in orphans if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, left
        assert after == before
        for deployment in ("LLMServer:tiny-nl", "LoraRegistry"):
            assert raylet_of("nl", deployment) == head_raylet, deployment
        listing = httpx.get(f"{base}/v1/adapters", timeout=30).json()["data"]
        assert {a["name"]: a["adapter_id"] for a in listing} == ids_before
        assert (Path(config.registry.adapter_cache) / added.json()["checksum"]).is_dir()
        logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
        secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
        assert not [p for p in logs.rglob("*") if p.is_file() and secret in p.read_bytes()]
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()  # Serve stops its HAProxy; `ray stop` alone would orphan it
        with contextlib.suppress(Exception):
            ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=180)
