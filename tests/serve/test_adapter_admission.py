"""An adapter that requests are using is never dropped from the engine under them.

One replica with room for one adapter: while a long stream uses adapter "one", requests for
adapters "two" (one request) and "three" (two, sent later) wait for that stream to end (its client
hangs up once they wait), and a base request in the meantime does not wait at all. Dropping "one" at once would make vLLM reload it from
disk at its next step for the stream still running: the test takes its files away once the stream
has started, so such a reload would fail the stream. When the slot frees, "three" takes it first:
it has more requests waiting (vLLM's own scheduler serves the oldest waiting request's adapter).

The adapters carry LoRA on q_proj and v_proj only, and "one" is given at start, so the engine
applies LoRA to those two modules only (`lora_target_modules: auto`): every answer is still checked
against peft, and an adapter that needs other modules is refused."""

import threading
import time

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from ray import serve
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve_app.app import build_from_config
from serve_app.config import AppConfig
from serve_app.model_types import TINY_CHAT_DIR
from serve_app.template import get_template
from tests.adapter_factory import make_adapter
from tests.serve_fixtures import BASE, FAST_START, STATE

pytestmark = pytest.mark.slow
URL = f"{BASE}/admission"
QUERY = "who are you?"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("admission-adapters")
    return root, {
        name: make_adapter(root / name, rank=4, seed=seed) for name, seed in (("one", 7), ("two", 8), ("three", 9))
    }


@pytest.fixture(scope="module")
def app(serve_instance, adapters):
    config = AppConfig.model_validate(
        {
            "models": [
                {
                    "name": "tiny-one-slot",
                    "model_type": "tiny-chat",
                    "engine": {
                        **FAST_START,
                        "dtype": "float32",
                        "max_model_len": 1024,
                        "enable_lora": True,
                        "max_loras": 1,
                        "max_cpu_loras": 1,  # one adapter in the engine at all: requests wait for the slot
                        "max_lora_rank": 16,
                    },
                    "deployment": {"num_replicas": 1},
                    # q_proj/v_proj adapters: lora_target_modules auto gives the engine LoRA there only
                    "lora_modules": {"one": {"path": str(adapters[1]["one"]), "preload": False}},
                }
            ],
            "registry": {"state_dir": f"{STATE}/admission", "allowed_roots": [str(adapters[0])]},
        }
    )
    serve_instance.run(build_from_config(config), name="admission", route_prefix="/admission")
    for name, path in list(adapters[1].items())[1:]:  # registered at runtime
        body = {"lora_name": name, "lora_path": str(path)}
        response = httpx.post(f"{URL}/v1/load_lora_adapter", json=body, timeout=60)
        assert response.status_code == 200, response.text
    yield URL
    serve.delete("admission")


def peft_answer(path, max_tokens: int) -> list[int]:
    """The greedy token ids of transformers + peft (compared as ids: random adapters end in partial
    UTF-8 bytes, which text decoders render differently)."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_CHAT_DIR)
    ids, _ = get_template("qwen", tokenizer).encode(QUERY)
    base = AutoModelForCausalLM.from_pretrained(TINY_CHAT_DIR, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(path)).eval()
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos)
    return out[0, len(ids) :].tolist()


def test_waiting_adapters_take_the_slot_after_the_stream_most_requests_first(app, adapters):
    client = openai.OpenAI(base_url=f"{app}/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": QUERY}]
    started, release, done, answers = threading.Event(), threading.Event(), {}, {}

    def long_stream():
        """Streams until released (the client hangs up), long after the others queued behind it."""
        stream = client.chat.completions.create(
            model="one", messages=messages, max_tokens=960, temperature=0, extra_body={"ignore_eos": True}, stream=True
        )
        for _ in stream:
            started.set()
            if release.is_set():
                break
        stream.close()
        done["one"] = time.monotonic()

    def ask(model: str, key: str):
        reply = client.chat.completions.create(
            model=model, messages=messages, max_tokens=12, temperature=0, extra_body={"return_token_ids": True}
        )
        answers[key] = reply.choices[0].model_extra["token_ids"]
        done[key] = time.monotonic()

    one = adapters[1]["one"]
    threads = [threading.Thread(target=long_stream)]
    threads[0].start()
    try:
        assert started.wait(60)
        one.rename(one.with_name("one-away"))  # in the engine now; a reload from disk would fail
        asks = [("two", "two"), ("three", "three"), ("three", "three again"), ("tiny-one-slot", "base")]
        threads += [threading.Thread(target=ask, args=ask_args) for ask_args in asks]
        for t in threads[1:]:
            t.start()
            time.sleep(0.15)  # "two" waits first
        threads[-1].join(60)  # the base request did not wait for the stream
        time.sleep(1)  # the others are waiting for the slot
        release.set()
        for t in threads:
            t.join(120)
    finally:
        one.with_name("one-away").rename(one)

    assert done["base"] < done["one"]  # base did not wait
    assert done["one"] < max(done["three"], done["three again"]) < done["two"]  # most waiting requests first
    assert answers["two"] == peft_answer(adapters[1]["two"], 12)
    assert answers["three"] == answers["three again"] == peft_answer(adapters[1]["three"], 12)
    time.sleep(6)  # a residency heartbeat
    held = [r["name"] for r in httpx.get(f"{app}/v1/adapters", timeout=30).json()["data"] if r["replicas"]]
    assert held == ["two"]  # "one" left the engine once its stream ended, then "three"


def test_lora_only_where_the_startup_adapters_have_it_and_wider_adapters_are_refused(app, adapters):
    listing = httpx.get(f"{app}/v1/adapters", timeout=30).json()
    assert [r["lora_modules"] for r in listing["engine_replicas"]] == [["q_proj", "v_proj"]], listing
    wide = make_adapter(adapters[0] / "all-linear", seed=3, targets=("q_proj", "v_proj", "o_proj", "down_proj"))
    response = httpx.post(f"{app}/v1/load_lora_adapter", json={"lora_name": "wide", "lora_path": str(wide)}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "['down_proj', 'o_proj']" in error["message"] and "lora_target_modules: auto" in error["message"], error
    assert "wide" not in {r["name"] for r in httpx.get(f"{app}/v1/adapters", timeout=30).json()["data"]}
