"""Changing a running app under steady streaming load: no failed request, no stream cut short.

A changed config deployed to a running app (`serve deploy` of a new serve_config.yaml, or
`serve.run` again) replaces every deployment's replicas: Serve gives a changed `args` a new code
version. Serve rolls them one at a time; a stopping replica finishes the requests it has (HAProxy
sends new ones to the remaining or the new replica, or through Serve's proxy, which waits for one).
"""

import threading
import time

import httpx
import openai
import pytest
from pydantic import ValidationError
from ray import serve

from serve_app.app import build_app
from serve_app.model_types import TINY_CHAT_DIR, XIAO_HUANG_DIR
from tests.serve_fixtures import BASE, STATE

pytestmark = pytest.mark.slow
URL = f"{BASE}/steady"
ENGINE = "LLMServer:tiny-steady"
# Quick to scale either way, so that a test of a few seconds sees it do both.
FAST_AUTOSCALING = dict(
    target_ongoing_requests=1, upscale_delay_s=1, downscale_delay_s=2, metrics_interval_s=0.5, look_back_period_s=1
)


def app_args(adapters: dict, max_replicas: int, second_model: bool = False) -> dict:
    """`serve_config.yaml`'s `args` for this app (pt engines: the subject is Serve's rollout)."""
    autoscaling = {"min_replicas": 1, "max_replicas": max_replicas, **FAST_AUTOSCALING}
    models = [
        {
            "name": "tiny-steady",
            "model_type": "tiny-chat",
            "infer_backend": "pt",
            "lora_modules": adapters,
            "deployment": {"autoscaling": autoscaling, "max_ongoing_requests": 4},
        }
    ]
    if second_model:
        models.append({"name": "tiny-second", "model_id_or_path": str(TINY_CHAT_DIR), "infer_backend": "pt"})
    return {"models": models, "registry": {"state_dir": f"{STATE}/steady"}}


def run(args: dict) -> None:
    serve.run(build_app(args), name="steady", route_prefix="/steady")


def engine_replicas() -> set[str]:
    """The names of the engine deployment's replica actors now (SERVE_REPLICA::<app>#<deployment>#<id>)."""
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"::steady#{ENGINE}#" in a["name"]}


def running_engines() -> int:
    return serve.status().applications["steady"].deployments[ENGINE].replica_states.get("RUNNING", 0)


def wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


class SteadyLoad:
    """Threads streaming chat completions back to back through the official openai client, with its
    default retries, as users call the app; every outcome is kept, and every HTTP attempt counted.

    A request can meet a closed connection while HAProxy reloads for new replicas (one of ~60 in a
    run on an AMD EPYC got "Server disconnected without sending a response" from a bare httpx
    client); the client retries it as it retries any connection error, before any token was sent.
    An HTTP 5xx answer counts as a failure even when the retry then succeeds."""

    def __init__(self, clients: int, model: str = "tiny-steady"):
        self.outcomes: list[str] = []  # "ok", or what went wrong
        self.attempts = 0  # HTTP requests sent, retries included
        self.stops = [threading.Event() for _ in range(clients)]
        self.threads = [threading.Thread(target=self._run, args=(stop, model)) for stop in self.stops]
        for t in self.threads:
            t.start()

    def _count_attempt(self, request: httpx.Request) -> None:
        self.attempts += 1

    def _check_status(self, response: httpx.Response) -> None:
        if response.status_code >= 500:  # the client would retry it; the app must not answer so
            self.outcomes.append(f"HTTP {response.status_code} (retried by the client)")

    def _run(self, stop: threading.Event, model: str) -> None:
        hooks = {"request": [self._count_attempt], "response": [self._check_status]}
        http = httpx.Client(timeout=300, event_hooks=hooks)
        with openai.OpenAI(base_url=f"{URL}/v1", api_key="unused", http_client=http) as client:
            while not stop.is_set():
                self.outcomes.append(self._one(client, model))

    @staticmethod
    def _one(client: openai.OpenAI, model: str) -> str:
        messages = [{"role": "user", "content": "count"}]
        try:
            stream = client.chat.completions.create(
                model=model, messages=messages, max_tokens=64, stream=True, extra_body={"ignore_eos": True}
            )
            chunks = list(stream)
        except (openai.OpenAIError, httpx.HTTPError) as e:  # HTTP errors, error events, a cut stream
            return f"{type(e).__name__}: {e}"
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        return "ok" if finish == ["length"] else f"cut short: finish_reason {finish}"

    def keep(self, clients: int) -> None:
        for stop in self.stops[clients:]:
            stop.set()

    def finish(self) -> list[str]:
        self.keep(0)
        for t in self.threads:
            t.join(timeout=300)
        return self.outcomes


def test_config_changes_and_a_downscale_under_load_lose_nothing(serve_instance):
    run(app_args({"xh": str(XIAO_HUANG_DIR)}, max_replicas=1))
    first_engine = engine_replicas()
    load = SteadyLoad(clients=3)
    try:
        wait_for(lambda: len(load.outcomes) >= 3, timeout=60)
        # One changed config: a new adapter entry, new autoscaling bounds, a new model. Every
        # deployment gets new replicas while the streams go on.
        before_change = len(load.outcomes)
        run(app_args({"xh": str(XIAO_HUANG_DIR), "xh-2": str(XIAO_HUANG_DIR)}, max_replicas=2, second_model=True))
        assert not engine_replicas() & first_engine  # the engine replica was replaced under load
        models = {m["id"] for m in httpx.get(f"{URL}/v1/models", timeout=30).json()["data"]}
        assert {"xh", "xh-2", "tiny-second"} <= models
        # 3 clients over a target of 1 per replica: the new bounds let it grow to 2...
        wait_for(lambda: running_engines() == 2, timeout=90)
        during_change = len(load.outcomes) - before_change
        # ...and with one client left it shrinks back while that client streams on
        load.keep(1)
        wait_for(lambda: running_engines() == 1, timeout=90)
        # A config error is refused, naming the field, and the running app keeps serving.
        with pytest.raises(ValidationError, match="max_replicas"):
            run(app_args({}, max_replicas=0))
        served = len(load.outcomes)
        wait_for(lambda: len(load.outcomes) > served, timeout=60)
    finally:
        outcomes = load.finish()
    failed = [o for o in outcomes if o != "ok"]
    print(f"{len(outcomes)} streams, {load.attempts - len(outcomes)} retried by the client")
    assert not failed, failed[:5]
    assert during_change > 0, "no stream ran across the change"
