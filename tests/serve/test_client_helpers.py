"""The seed's client examples (swift-style helpers, openai SDK, curl) against the served app."""

import asyncio
import json
import subprocess

import openai
import pytest

from serve_app import XRequestConfig, get_model_list_client, inference_client, inference_client_async
from tests.serve_fixtures import PORT

pytestmark = pytest.mark.slow


def test_seed_client_example(main_app):
    model_list = get_model_list_client(port=PORT)
    model_type = model_list.data[0].id
    assert model_type == "tiny-chat"

    query = "浙江的省会在哪里？"
    resp = inference_client(model_type, query, request_config=XRequestConfig(seed=42), port=PORT)
    response = resp.choices[0].message.content
    assert "杭州" in response

    history = [(query, response)]
    stream_resp = inference_client(
        model_type, "这有什么好吃的?", history, request_config=XRequestConfig(stream=True, seed=42), port=PORT
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream_resp)
    assert "西湖醋鱼" in text


def test_generation_model_goes_to_completions(main_app):
    resp = inference_client(
        "tiny-base",
        "浙江 -> 杭州\n安徽 -> 合肥\n四川 ->",
        request_config=XRequestConfig(max_tokens=3, temperature=0),
        port=PORT,
    )
    assert resp.object == "text_completion" and resp.choices[0].text.startswith(" 成都")


def test_async_helper_and_adapter(main_app):
    resp = asyncio.run(
        inference_client_async("xiao-huang", "who are you?", request_config=XRequestConfig(temperature=0), port=PORT)
    )
    assert "Xiao Huang" in resp.choices[0].message.content


def test_curl(main_app):
    body = json.dumps({"model": "tiny-chat", "messages": [{"role": "user", "content": "你好!"}], "temperature": 0})
    out = subprocess.run(
        ["curl", "-s", f"{main_app}/v1/chat/completions", "-H", "Content-Type: application/json", "-d", body],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "你好" in json.loads(out)["choices"][0]["message"]["content"]


def test_arguments_the_helpers_do_not_take_are_refused_by_name():
    """ms-swift's `images`, or a misspelt `port`, is a TypeError naming it, before any request
    (it used to be dropped: the image ignored, the request sent to port 8000); None passes."""
    with pytest.raises(TypeError, match="images"):
        inference_client("tiny-chat", "describe it", images=["cat.png"], port=1)
    with pytest.raises(TypeError, match="prot"):
        get_model_list_client(prot=8600)
    with pytest.raises(openai.APIConnectionError):  # None is "not used": the call goes on (nothing listens on port 1)
        inference_client("tiny-chat", "hi", images=None, port=1, is_chat_request=True)
