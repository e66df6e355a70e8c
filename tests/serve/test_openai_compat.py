"""OpenAI and vLLM compatibility faults that a peer's conformance tests found, each through the real
stack: the ingress validates what it can, and the engine's own validation errors are 400s."""

import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest

from serve_app.model_types import XIAO_HUANG_DIR
from serve_app.tiny_chat.corpus import ZJ_CAPITAL
from tests.adapter_factory import make_adapter
from tests.serve_fixtures import STATE

pytestmark = pytest.mark.slow
ZJ = [{"role": "user", "content": "浙江的省会在哪？"}]


def post(main_app, path, body):
    return httpx.post(f"{main_app}{path}", json=body, timeout=120)


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"stop_token_ids": [999999]}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"max_token": 5}, "max_token"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
    ],
)
def test_bad_fields_are_400_naming_them(main_app, extra, param):
    reply = post(main_app, "/v1/chat/completions", {"model": "tiny-chat", "messages": ZJ, **extra})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    if param:
        assert param in error["message"] or error["param"] == param
    else:
        assert "text-only" in error["message"]


def test_out_of_vocabulary_prompt_ids_are_400(main_app):
    reply = post(main_app, "/v1/completions", {"model": "tiny-chat", "prompt": [999999], "max_tokens": 2})
    assert reply.status_code == 400 and "vocabulary" in reply.json()["error"]["message"]


def test_text_parts_are_joined(client):
    parts = [{"type": "text", "text": "浙江的省会"}, {"type": "text", "text": "在哪？"}]
    reply = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": parts}])
    assert reply.choices[0].message.content == ZJ_CAPITAL


def test_prefill_system_only_and_continue_final_message(client):
    # a prefix that ends on a token boundary of the trained answer "The capital of Zhejiang is Hangzhou."
    question = [{"role": "user", "content": "What is the capital of Zhejiang?"}]
    prefill = [*question, {"role": "assistant", "content": "The capital of Zhejiang is"}]
    reply = client.chat.completions.create(
        model="tiny-chat",
        messages=prefill,
        max_tokens=8,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    assert reply.choices[0].message.content == " Hangzhou."
    # a trailing assistant message with the defaults, and a system-only conversation: both valid
    for messages in (prefill, [{"role": "system", "content": "You are a helpful assistant."}]):
        assert client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=4).choices


def test_completion_logprobs_shape(client):
    reply = client.completions.create(model="tiny-chat", prompt="浙江 -> ", max_tokens=4, logprobs=0, temperature=0)
    lp = reply.choices[0].logprobs
    assert all(top == {tok: val} for top, tok, val in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    echo = client.completions.create(
        model="tiny-chat", prompt="浙江 -> ", max_tokens=4, logprobs=1, echo=True, temperature=0
    )
    elp = echo.choices[0].logprobs
    assert elp.token_logprobs[0] is None and elp.top_logprobs[0] is None
    assert "".join(elp.tokens) == echo.choices[0].text and echo.choices[0].text.startswith("浙江 -> ")
    assert all(v is not None for v in elp.token_logprobs[1:])
    assert elp.tokens[-4:] == lp.tokens  # the completion's own tokens, after the prompt's


def test_logit_bias_is_applied(client):
    def first_token(**extra):
        reply = client.completions.create(
            model="tiny-chat",
            prompt="浙江 -> ",
            max_tokens=1,
            temperature=0,
            extra_body={"return_token_ids": True},
            **extra,
        )
        return reply.choices[0].model_extra["token_ids"][0]

    greedy = first_token()
    assert first_token(logit_bias={str(greedy): -100}) != greedy
    assert first_token(logit_bias={"5": 100}) == 5


def test_a_batch_of_prompts(client):
    prompts = ["浙江 -> ", "四川 -> "]
    one = [
        client.completions.create(model="tiny-chat", prompt=p, max_tokens=3, temperature=0).choices[0].text
        for p in prompts
    ]
    batch = client.completions.create(model="tiny-chat", prompt=prompts, max_tokens=3, temperature=0)
    assert [(c.index, c.text) for c in batch.choices] == [(0, one[0]), (1, one[1])]
    sampled = client.completions.create(model="tiny-chat", prompt=prompts, max_tokens=3, temperature=1, n=2, seed=1)
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3] and sampled.usage.completion_tokens == 12
    stream = client.completions.create(model="tiny-chat", prompt=prompts, max_tokens=3, temperature=0, stream=True)
    texts = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {0: one[0], 1: one[1]}
    ids = client.completions.create(model="tiny-chat", prompt=[[5, 6], [7, 8]], max_tokens=2, temperature=0)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 4


def test_vllm_extras(client, main_app):
    reply = client.chat.completions.create(
        model="tiny-chat",
        messages=ZJ,
        temperature=0,
        extra_body={"prompt_logprobs": 1, "return_token_ids": True, "truncate_prompt_tokens": 6},
    )
    extra = reply.model_extra
    assert len(extra["prompt_token_ids"]) == 6 == reply.usage.prompt_tokens
    assert extra["prompt_logprobs"][0] is None and len(extra["prompt_logprobs"]) == 6
    assert reply.choices[0].model_extra["token_ids"]
    chunks = list(
        client.chat.completions.create(
            model="tiny-chat",
            messages=ZJ,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )
    assert all(c.usage is not None for c in chunks)
    assert chunks[-1].usage.completion_tokens > chunks[0].usage.completion_tokens
    assert httpx.get(f"{main_app}/version").json()["version"]


def test_priority_needs_priority_scheduling(main_app):
    reply = post(main_app, "/v1/chat/completions", {"model": "tiny-chat", "messages": ZJ, "priority": 3})
    assert reply.status_code == 400 and "priority" in reply.json()["error"]["message"].lower()
    ok = post(main_app, "/v1/chat/completions", {"model": "tiny-chat", "messages": ZJ, "priority": 0, "max_tokens": 2})
    assert ok.status_code == 200


def test_tokenize_and_detokenize(client, main_app):
    chat = client.chat.completions.create(model="tiny-chat", messages=ZJ, max_tokens=1)
    counted = post(main_app, "/tokenize", {"model": "xiao-huang", "messages": ZJ}).json()
    assert counted["count"] == chat.usage.prompt_tokens and counted["max_model_len"] == 512
    plain = post(main_app, "/tokenize", {"model": "tiny-chat", "prompt": "浙江 -> ", "return_token_strs": True}).json()
    assert len(plain["token_strs"]) == plain["count"]
    back = post(main_app, "/detokenize", {"model": "tiny-chat", "tokens": plain["tokens"]}).json()
    assert back == {"prompt": "浙江 -> "}
    assert post(main_app, "/detokenize", {"model": "tiny-chat", "tokens": [999999]}).status_code == 400
    assert post(main_app, "/tokenize", {"model": "tiny-chat"}).status_code == 400


@pytest.mark.parametrize(
    "change, match",
    [({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save")],
)
def test_adapters_vllm_cannot_load_are_refused_at_registration(main_app, change, match):
    path = make_adapter(Path(STATE) / "main" / "adapters" / f"variant-{match}")  # inside an allowed root
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps(config | change))
    reply = post(main_app, "/v1/load_lora_adapter", {"lora_name": "variant", "lora_path": str(path)})
    assert reply.status_code == 400 and match in reply.json()["error"]["message"]
    assert httpx.get(f"{main_app}/v1/models/variant").status_code == 404


def test_responses_parse_with_the_openai_types(client):
    """Unknown response keys would not fail the client, so check the ones OpenAI defines."""
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.chat.completions.create(model="tiny-chat", messages=ZJ, extra_body={"reasoning_effort": "low"})


def test_an_adapter_folder_with_its_own_chat_template_renders_with_it(main_app):
    folder = Path(STATE) / "main" / "adapters" / "own-template"
    shutil.copytree(XIAO_HUANG_DIR, folder, dirs_exist_ok=True)
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert post(main_app, "/v1/load_lora_adapter", {"lora_name": "own-template", "lora_path": str(folder)}).is_success

    def rendered(model: str) -> str:
        ids = post(main_app, "/tokenize", {"model": model, "messages": ZJ}).json()["tokens"]
        return post(main_app, "/detokenize", {"model": model, "tokens": ids}).json()["prompt"]

    assert rendered("own-template") == "<|im_start|>user\n浙江的省会在哪？<|im_end|>\n<|im_start|>assistant\n"
    assert rendered("xiao-huang").startswith("<|im_start|>system\nYou are a helpful assistant.")


def test_malformed_parts_and_combinations_are_400_and_nulls_are_defaults(main_app):
    def chat(**extra):
        return post(main_app, "/v1/chat/completions", {"model": "tiny-chat", "messages": ZJ, "max_tokens": 2, **extra})

    for extra in (
        {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "cache_control": {}}]}]},
        {"top_logprobs": 2},
        {"prompt_logprobs": 1, "stream": True},
        {"structured_outputs": {"json_object": False}},
    ):
        reply = chat(**extra)
        assert reply.status_code == 400 and "Traceback" not in reply.text, (extra, reply.text)
    assert chat(n=None, min_p=None, stream=None, presence_penalty=None).status_code == 200
