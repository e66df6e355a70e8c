"""Bad input to the offline API gets exceptions that name the fix."""

import pytest

from serve_app import LoRARequest, get_template, get_vllm_engine, inference_vllm
from serve_app.errors import ConfigError
from tests.adapter_factory import make_adapter, make_foreign_adapter


def test_unknown_model_type_suggests_close_names():
    with pytest.raises(ConfigError, match=r"unknown model_type 'qwen-7b-chatt'.*Did you mean 'qwen-7b-chat'"):
        get_vllm_engine("qwen-7b-chatt")


def test_missing_checkpoint_dir(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; check the path"):
        get_vllm_engine(model_id_or_path=str(tmp_path / "nope"))


def test_checkpoint_dir_without_config(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        get_vllm_engine(model_id_or_path=str(tmp_path))


@pytest.mark.slow
def test_adapter_for_another_base_model(vllm_engine, tmp_path):
    foreign = make_foreign_adapter(tmp_path / "foreign")
    template = get_template("qwen", vllm_engine.hf_tokenizer)
    with pytest.raises(ConfigError, match="trained for another base model.*q_proj expects 256 features"):
        inference_vllm(vllm_engine, template, [{"query": "hi"}], lora_request=LoRARequest("f", 90, str(foreign)))


@pytest.mark.slow
def test_adapter_rank_over_max_lora_rank(vllm_engine, tmp_path):
    big = make_adapter(tmp_path / "rank32", rank=32)
    template = get_template("qwen", vllm_engine.hf_tokenizer)
    with pytest.raises(ConfigError, match="rank 32 .* max_lora_rank=16; start the engine with max_lora_rank >= 32"):
        inference_vllm(vllm_engine, template, [{"query": "hi"}], lora_request=LoRARequest("big", 91, str(big)))


@pytest.mark.slow
def test_not_an_adapter(vllm_engine, tmp_path):
    template = get_template("qwen", vllm_engine.hf_tokenizer)
    with pytest.raises(ConfigError, match="adapter_config.json is missing"):
        inference_vllm(vllm_engine, template, [{"query": "hi"}], lora_request=LoRARequest("x", 92, str(tmp_path)))


def test_unknown_engine_options_are_refused_by_name_before_any_engine_starts():
    with pytest.raises(ConfigError, match=r"does not take \['use_async'\].*engine_kwargs"):
        get_vllm_engine("tiny-chat", use_async=True)
    # ms-swift's callers pass engine_kwargs=None: that is the default, not an error; a bad value is
    with pytest.raises(ValueError, match="max_loras") as refused:
        get_vllm_engine("tiny-chat", engine_kwargs=None, max_loras=0)
    assert "engine_kwargs" not in str(refused.value)


@pytest.mark.parametrize(
    "item, match",
    [
        ({"question": "hi"}, r"request_list\[0\] needs a 'query' string \(got \['question'\]\)"),
        ({"query": 5}, "needs a 'query' string"),
        ({"query": "hi", "images": ["cat.png"]}, r"has keys \['images'\]"),
        ({"query": "hi", "history": [["only a question"]]}, "string pairs"),
    ],
)
def test_a_request_of_the_wrong_shape_is_named(vllm_engine, item, match):
    template = get_template("qwen", vllm_engine.hf_tokenizer)
    with pytest.raises(ValueError, match=match):
        inference_vllm(vllm_engine, template, [item])


def test_a_generation_setting_that_does_not_exist_is_refused(vllm_engine):
    with pytest.raises(AttributeError, match="no setting 'max_new_token'; it has max_new_tokens"):
        vllm_engine.generation_config.max_new_token = 5
