"""The tool-call parsers on texts whose split into stream deltas is chosen to be awkward."""

import json

import pytest

from deployments.http.tool_calls import FORMATS, ToolCallStream, call_schema, forced_calls, parse_auto, parse_forced

HERMES = FORMATS["hermes"]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Hangzhou"}}\n</tool_call>'


def stream(fmt, text: str, cut: int, forced=False):
    """Feed `text` in pieces of `cut` characters: (streamed content, final content, calls)."""
    s = ToolCallStream(fmt, forced)
    streamed = "".join(s.feed(text[i : i + cut]) for i in range(0, len(text), cut))
    rest, calls = s.finish()
    return streamed, rest, calls


def test_hermes_calls_and_content():
    content, calls = parse_auto(HERMES, "Let me look.\n" + CALL + "\n" + CALL.replace("Hangzhou", "Chengdu"))
    assert content == "Let me look."
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Hangzhou"}, {"city": "Chengdu"}]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert calls[0]["id"] != calls[1]["id"]


def test_text_that_does_not_parse_stays_content():
    text = "<tool_call>\n{not json}\n</tool_call>"
    assert parse_auto(HERMES, text) == (text, [])
    assert parse_auto(HERMES, "plain answer") == ("plain answer", [])


@pytest.mark.parametrize("cut", [1, 2, 3, 7, 1000])
def test_streaming_never_leaks_a_tool_call_as_content(cut):
    streamed, rest, calls = stream(HERMES, "Sure. " + CALL, cut)
    assert streamed + rest == "Sure. " and len(calls) == 1
    streamed, rest, calls = stream(HERMES, "a < b, and <tool is a word", cut)
    assert streamed + rest == "a < b, and <tool is a word" and calls == []


def test_forced_bare_json_call():
    fmt = FORMATS["llama3_json"]
    args = '{"name": "get_weather", "parameters": {"city": "Hangzhou"}}'
    assert json.loads(parse_forced(fmt, args)[0]["function"]["arguments"]) == {"city": "Hangzhou"}
    assert parse_forced(fmt, args[:20]) == []  # cut off by max_tokens: no call
    streamed, rest, calls = stream(fmt, args, 5, forced=True)
    assert streamed == "" and rest == "" and len(calls) == 1


def test_forced_tagged_calls_stream_nothing_as_content():
    streamed, rest, calls = stream(HERMES, CALL + "\n" + CALL, 4, forced=True)
    assert streamed == "" and rest == "" and len(calls) == 2


def test_llama3_json():
    fmt = FORMATS["llama3_json"]
    content, calls = parse_auto(fmt, '{"name": "f", "parameters": {"x": 1}}')
    assert content is None and calls[0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    assert parse_auto(fmt, "no call") == ("no call", [])


def test_forced_constraints_pin_the_name():
    tools = [
        {"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "b"}},
    ]
    assert call_schema(HERMES, tools[1])["properties"]["name"] == {"type": "string", "enum": ["b"]}
    tag = json.loads(forced_calls(HERMES, tools, "b", single=True).structural_tag)["format"]
    assert [t["content"]["json_schema"]["properties"]["name"]["enum"] for t in tag["tags"]] == [["b"]]
    assert tag["stop_after_first"] and tag["at_least_one"] and tag["tags"][0]["begin"] == "<tool_call>\n"
    assert len(json.loads(forced_calls(FORMATS["llama3_json"], tools, None, single=False).json)["anyOf"]) == 2


@pytest.mark.parametrize("cut", [1, 3, 1000])
def test_streamed_content_around_calls_is_all_there(cut):
    text = "\n\nHi." + CALL + "\nAfter."
    streamed, rest, calls = stream(HERMES, text, cut)
    assert len(calls) == 1 and (streamed + rest).strip() == "Hi.\nAfter." == parse_auto(HERMES, text)[0]
