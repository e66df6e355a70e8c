import json

import pytest

from serve_app import ModelType, get_default_template_type
from serve_app.errors import ConfigError
from serve_app.model_types import MODELS, TINY_CHAT_DIR, XIAO_HUANG_DIR, resolve_model_dir

SEED_TYPES = {
    "qwen-7b-chat": "qwen",
    "qwen-7b": "default-generation",
    "chatglm3-6b": "chatglm3",
    "yi-6b-chat": "chatml",
    "llama2-7b-chat": "llama",
    "llama3-8b-instruct": "llama3",
    "qwen1half-7b-chat-int4": "qwen",
    "tiny-chat": "qwen",
}


def test_seed_model_types_and_their_templates():
    assert {t: get_default_template_type(t) for t in SEED_TYPES} == SEED_TYPES
    assert ModelType.qwen_7b_chat == "qwen-7b-chat" and ModelType.tiny_chat == "tiny-chat"
    assert MODELS["qwen-7b"].is_chat is False


def test_tiny_chat_is_embedded_and_small():
    config = json.loads((TINY_CHAT_DIR / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    assert (TINY_CHAT_DIR / "model.safetensors").stat().st_size <= 8 * 1024 * 1024
    assert resolve_model_dir("tiny-chat", None) == str(TINY_CHAT_DIR)
    adapter = json.loads((XIAO_HUANG_DIR / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["base_model_name_or_path"] == "tiny-chat"


def test_explicit_checkpoint_dir_wins(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_dir("qwen-7b-chat", str(tmp_path)) == str(tmp_path.resolve())


def test_hub_model_type_resolves_to_its_hub_id():
    assert resolve_model_dir("llama3-8b-instruct", None) == "meta-llama/Meta-Llama-3-8B-Instruct"


def test_unknown_model_type():
    with pytest.raises(ConfigError, match="Known model types: .*tiny-chat"):
        get_default_template_type("gpt-5")
