"""The pt backend gives the same result dicts, with several adapters on one base model."""

import pytest

from serve_app import LoRARequest, get_template, inference_stream_vllm, inference_vllm
from serve_app.model_types import XIAO_HUANG_DIR

pytestmark = pytest.mark.slow


def test_pt_matches_vllm_greedy(pt_engine, vllm_engine):
    requests = [
        {"query": "浙江的省会在哪？"},
        {"query": "这有什么好吃的", "history": [["浙江的省会在哪？", "浙江的省会是杭州。"]]},
    ]
    template = get_template("qwen", pt_engine.hf_tokenizer)
    assert inference_vllm(pt_engine, template, requests) == inference_vllm(vllm_engine, template, requests)


def test_pt_serves_several_adapters_on_one_base(pt_engine, random_adapter):
    template = get_template("qwen", pt_engine.hf_tokenizer)
    query = [{"query": "who are you?"}]
    xiao = LoRARequest("xiao-huang", 1, str(XIAO_HUANG_DIR))
    other = LoRARequest("random-a", 2, str(random_adapter))
    answers = [
        inference_vllm(pt_engine, template, query)[0]["response"],
        inference_vllm(pt_engine, template, query, lora_request=xiao)[0]["response"],
        inference_vllm(pt_engine, template, query, lora_request=other)[0]["response"],
        inference_vllm(pt_engine, template, query)[0]["response"],
    ]
    assert "Xiao Huang" in answers[1]
    assert len(set(answers[:3])) == 3  # base, xiao-huang and the random adapter all differ
    assert answers[3] == answers[0]  # base again after adapters were used


def test_pt_stream_ends_at_batch_answer(pt_engine):
    template = get_template("qwen", pt_engine.hf_tokenizer)
    requests = [{"query": "你好!"}]
    chunks = [r[0]["response"] for r in inference_stream_vllm(pt_engine, template, requests)]
    assert all(b.startswith(a) for a, b in zip(chunks, chunks[1:]))
    assert chunks[-1] == inference_vllm(pt_engine, template, requests)[0]["response"]
