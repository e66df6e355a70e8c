"""Structured outputs and tool calling through Serve, vLLM on the CPU and the official openai client.

tiny-chat was trained (serve_app/tiny_chat/corpus.py) to answer two questions in JSON and to call
`get_weather` in Qwen2.5's format, so every path here runs end to end on the real model: a schema
that admits the trained answer leaves greedy output as it is, and a forced call is the trained one.
"""

import json

import httpx
import openai
import pytest
from pydantic import BaseModel

from serve_app.tiny_chat.corpus import (
    HANGZHOU_WEATHER,
    HANGZHOU_WEATHER_ANSWER,
    WEATHER_QUESTION,
    WEATHER_TOOL,
    ZJ_CAPITAL_JSON,
)

pytestmark = pytest.mark.slow
JSON_QUESTION = [{"role": "user", "content": "Give the capital of Zhejiang as JSON."}]
WEATHER = [{"role": "user", "content": WEATHER_QUESTION}]


class Capital(BaseModel):
    province: str
    capital: str


@pytest.mark.parametrize("model", ["tiny-chat", "xiao-huang"])
def test_parse_with_a_pydantic_model(client, model):
    reply = client.chat.completions.parse(model=model, messages=JSON_QUESTION, response_format=Capital, temperature=0)
    assert reply.choices[0].message.parsed == Capital(province="Zhejiang", capital="Hangzhou")
    assert reply.choices[0].message.content == ZJ_CAPITAL_JSON


def test_json_object_and_schema_streaming(client):
    reply = client.chat.completions.create(
        model="tiny-chat", messages=JSON_QUESTION, response_format={"type": "json_object"}, temperature=0
    )
    assert json.loads(reply.choices[0].message.content) == json.loads(ZJ_CAPITAL_JSON)
    schema = {"name": "capital", "strict": True, "schema": Capital.model_json_schema()}
    chunks = client.chat.completions.create(
        model="tiny-chat",
        messages=JSON_QUESTION,
        response_format={"type": "json_schema", "json_schema": schema},
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ZJ_CAPITAL_JSON


@pytest.mark.parametrize("stream", [False, True])
def test_vllm_structured_outputs_choice_and_regex(client, stream):
    def text(constraint, **kwargs):
        reply = client.completions.create(
            model="tiny-chat",
            prompt="浙江 -> ",
            max_tokens=8,
            temperature=0,
            stream=stream,
            extra_body={"structured_outputs": constraint},
            **kwargs,
        )
        return "".join(c.choices[0].text for c in reply) if stream else reply.choices[0].text

    assert text({"choice": ["杭州", "成都"]}) == "杭州"
    assert text({"choice": ["成都", "合肥"]}) in ("成都", "合肥")
    digits = text({"regex": "[0-9]{3}"})
    assert len(digits) == 3 and digits.isdigit()


@pytest.mark.parametrize(
    "body, match",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
            "nonsense",
        ),
        ({"extra_body": {"structured_outputs": {"regex": "("}}}, "regex"),
        ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}}, "exactly one"),
        ({"extra_body": {"guided_json": {"type": "object"}}}, "guided_json"),
        ({"extra_body": {"structured_outputs": {"json": {}, "disable_any_whitespace": True}}}, "per engine"),
    ],
)
def test_a_constraint_the_backend_cannot_compile_is_a_400(client, body, match):
    extra = body.pop("extra_body", {})
    with pytest.raises(openai.BadRequestError, match=match):
        client.chat.completions.create(model="tiny-chat", messages=JSON_QUESTION, extra_body=extra, **body)


def _call_arguments(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or ()]


@pytest.mark.parametrize("model", ["tiny-chat", "xiao-huang"])
def test_auto_tool_call(client, model):
    reply = client.chat.completions.create(model=model, messages=WEATHER, tools=[WEATHER_TOOL], temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert _call_arguments(choice.message) == [("get_weather", {"city": "Hangzhou"})]


def test_parallel_tool_calls_and_a_turn_without_one(client):
    def ask(**extra):
        messages = [{"role": "user", "content": "What's the weather like in Hangzhou and Chengdu?"}]
        reply = client.chat.completions.create(
            model="tiny-chat", messages=messages, tools=[WEATHER_TOOL], temperature=0, **extra
        )
        return _call_arguments(reply.choices[0].message)

    both = [("get_weather", {"city": "Hangzhou"}), ("get_weather", {"city": "Chengdu"})]
    assert ask() == both
    assert ask(parallel_tool_calls=False) == both[:1]
    hello = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "hello"}], tools=[WEATHER_TOOL], temperature=0
    )
    assert hello.choices[0].finish_reason == "stop" and not hello.choices[0].message.tool_calls
    assert hello.choices[0].message.content.startswith("Hello!")


def _streamed_calls(chunks) -> tuple[str, dict, str | None]:
    """(content, index -> [name, arguments], finish_reason), accumulated the way OpenAI's SDK does."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or ():
                slot = calls.setdefault(call.index, ["", ""])
                slot[0] += call.function.name or ""
                slot[1] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("tool_choice", ["auto", "required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_calls(client, tool_choice):
    chunks = client.chat.completions.create(
        model="tiny-chat", messages=WEATHER, tools=[WEATHER_TOOL], tool_choice=tool_choice, temperature=0, stream=True
    )
    content, calls, finish = _streamed_calls(chunks)
    assert content == "" and finish == "tool_calls"
    assert [(name, json.loads(args)) for name, args in calls.values()] == [("get_weather", {"city": "Hangzhou"})]


def test_required_forces_a_valid_call_where_the_model_would_not_call(client):
    """`hello` is answered in words under `auto`; `required` still yields a call whose arguments
    match the function's schema, because the output is constrained to it (a bounded string, so the
    untrained model's call ends within max_tokens)."""
    tool = json.loads(json.dumps(WEATHER_TOOL))
    tool["function"]["parameters"]["properties"]["city"]["maxLength"] = 12
    reply = client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "hello"}],
        tools=[tool],
        tool_choice="required",
        temperature=0,
        max_tokens=100,
    )
    [(name, args)] = _call_arguments(reply.choices[0].message)
    assert name == "get_weather" and isinstance(args["city"], str) and len(args["city"]) <= 12


def test_tool_results_go_back_into_the_conversation(client):
    """An agent loop: the assistant message as the API returned it, then the tool's result."""
    first = client.chat.completions.create(model="tiny-chat", messages=WEATHER, tools=[WEATHER_TOOL], temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *WEATHER,
        first.choices[0].message,
        {"role": "tool", "tool_call_id": call.id, "content": HANGZHOU_WEATHER},
    ]
    final = client.chat.completions.create(model="tiny-chat", messages=messages, tools=[WEATHER_TOOL], temperature=0)
    assert final.choices[0].message.content == HANGZHOU_WEATHER_ANSWER


def test_tool_choice_none_does_not_parse_calls(client):
    reply = client.chat.completions.create(
        model="tiny-chat", messages=WEATHER, tools=[WEATHER_TOOL], tool_choice="none", temperature=0
    )
    assert not reply.choices[0].message.tool_calls and "<tool_call>" in reply.choices[0].message.content


def test_tool_requests_that_cannot_be_served_are_400(main_app):
    def post(extra):
        body = {"model": "tiny-chat", "messages": WEATHER, "tools": [WEATHER_TOOL], **extra}
        return httpx.post(f"{main_app}/v1/chat/completions", json=body, timeout=60)

    named_other = {"type": "function", "function": {"name": "nope"}}
    assert "not in `tools`" in post({"tool_choice": named_other}).json()["error"]["message"]
    both = post({"tool_choice": "required", "response_format": {"type": "json_object"}})
    assert both.status_code == 400 and both.json()["error"]["param"] == "tool_choice"
    assert post({"functions": [{"name": "f"}]}).json()["error"]["param"] == "functions"


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_cut_by_the_token_limit_finish_with_length(client, stream):
    """`required` lets the untrained reply to `hello` go on calling until max_tokens cuts it: a
    call is complete, the next is not, and the client must learn that from finish_reason."""
    kwargs = dict(model="tiny-chat", messages=[{"role": "user", "content": "hello"}], tools=[WEATHER_TOOL])
    kwargs.update(tool_choice="required", temperature=0, max_tokens=40)
    if stream:
        _, calls, finish = _streamed_calls(client.chat.completions.create(stream=True, **kwargs))
    else:
        reply = client.chat.completions.create(**kwargs)
        calls, finish = reply.choices[0].message.tool_calls, reply.choices[0].finish_reason
        assert reply.usage.completion_tokens == 40
    assert calls and finish == "length"
