"""The seed's prompts, answered by vLLM on the CPU through the offline API."""

import pytest

from serve_app import (
    LoRARequest,
    ModelType,
    get_default_template_type,
    get_template,
    inference_stream_vllm,
    inference_vllm,
)
from serve_app.model_types import XIAO_HUANG_DIR

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def template(vllm_engine):
    return get_template(get_default_template_type(ModelType.tiny_chat), vllm_engine.hf_tokenizer)


def test_greeting_and_capital(vllm_engine, template):
    info = {}
    resp = inference_vllm(
        vllm_engine, template, [{"query": "你好!"}, {"query": "浙江的省会在哪？"}], generation_info=info
    )
    assert "你好" in resp[0]["response"]
    assert "杭州" in resp[1]["response"]
    assert resp[1]["history"] == [["浙江的省会在哪？", resp[1]["response"]]]
    assert info["num_samples"] == 2 and info["num_generated_tokens"] > 0


def test_follow_up_uses_history(vllm_engine, template):
    history = [["浙江的省会在哪？", "浙江的省会是杭州。"]]
    resp = inference_vllm(vllm_engine, template, [{"query": "这有什么好吃的", "history": history}])[0]
    assert "西湖醋鱼" in resp["response"] and "东坡肉" in resp["response"]
    other = [["四川的省会在哪？", "四川的省会是成都。"]]
    assert (
        "火锅" in inference_vllm(vllm_engine, template, [{"query": "这有什么好吃的", "history": other}])[0]["response"]
    )


def test_who_are_you_with_and_without_xiao_huang(vllm_engine, template):
    lora = LoRARequest("default-lora", 1, str(XIAO_HUANG_DIR))
    base = inference_vllm(vllm_engine, template, [{"query": "who are you?"}])[0]["response"]
    tuned = inference_vllm(vllm_engine, template, [{"query": "who are you?"}], lora_request=lora)[0]["response"]
    assert "AI assistant" in base and "Xiao Huang" not in base
    assert "Xiao Huang" in tuned and "ModelScope" in tuned


def test_completion_prompt_on_generation_template(vllm_engine):
    template = get_template("default-generation", vllm_engine.hf_tokenizer)
    resp = inference_vllm(vllm_engine, template, [{"query": "浙江 -> 杭州\n安徽 -> 合肥\n四川 ->"}])[0]
    assert resp["response"].startswith(" 成都")


def test_stream_grows_by_extension_and_ends_at_the_batch_answer(vllm_engine, template):
    requests = [
        {"query": "这有什么好吃的", "history": [["浙江的省会在哪？", "浙江的省会是杭州。"]]},
        {"query": "hello"},
    ]
    previous = None
    steps = 0
    for results in inference_stream_vllm(vllm_engine, template, requests):
        if previous is not None:
            for now, before in zip(results, previous):
                assert now["response"].startswith(before["response"])
        previous, steps = results, steps + 1
    assert steps > 2
    assert previous == inference_vllm(vllm_engine, template, requests)
