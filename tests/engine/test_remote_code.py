"""Checkpoints that ship their own code (auto_map) load only when trusted, with a clear error otherwise."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve_app import get_template, get_vllm_engine, inference_vllm
from serve_app.config import ModelConfig
from serve_app.engines.vllm_engine import engine_args
from serve_app.errors import ConfigError
from serve_app.model_types import TINY_CHAT_DIR
from tests.serve_fixtures import FAST_START

CONFIG_CODE = '''
from transformers import Qwen2Config


class TinyRemoteConfig(Qwen2Config):
    """The checkpoint's own config class: reading this checkpoint runs this file."""

    model_type = "tiny_remote"
'''


@pytest.fixture(scope="module")
def remote_checkpoint(tmp_path_factory):
    """tiny-chat's weights under a config class that only its own code defines."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-remote"
    shutil.copytree(TINY_CHAT_DIR, path)
    (path / "configuration_tiny_remote.py").write_text(CONFIG_CODE)
    config = json.loads((path / "config.json").read_text())
    config |= {"model_type": "tiny_remote", "auto_map": {"AutoConfig": "configuration_tiny_remote.TinyRemoteConfig"}}
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def test_model_types_that_need_their_code_trust_it_by_default():
    assert ModelConfig(model_type="chatglm3-6b").engine.trust_remote_code is True
    # qwen-7b-chat's checkpoint is converted to Qwen2 (tests/engine/test_qwen1_checkpoint.py): none of its code runs
    assert ModelConfig(model_type="qwen-7b-chat").engine.trust_remote_code is False
    assert ModelConfig(model_type="tiny-chat").engine.trust_remote_code is False
    assert ModelConfig(model_type="chatglm3-6b", engine={"trust_remote_code": False}).engine.trust_remote_code is False
    model = ModelConfig(model_type="chatglm3-6b")
    assert engine_args("/m", model.engine).trust_remote_code is True


def test_untrusted_code_is_refused_with_a_clear_error(remote_checkpoint):
    with pytest.raises(ValueError, match="ships its own Python code.*trust_remote_code: true"):
        ModelConfig(model_id_or_path=str(remote_checkpoint))
    with pytest.raises(ConfigError, match="config.json has auto_map"):
        get_vllm_engine(model_id_or_path=str(remote_checkpoint), max_model_len=512, **FAST_START)
    assert ModelConfig(model_id_or_path=str(remote_checkpoint), engine={"trust_remote_code": True})


@pytest.mark.slow
def test_trusted_code_loads_and_answers_like_the_same_weights(remote_checkpoint):
    engine = get_vllm_engine(
        model_id_or_path=str(remote_checkpoint), max_model_len=512, trust_remote_code=True, **FAST_START
    )
    try:
        engine.generation_config.max_new_tokens, engine.generation_config.temperature = 24, 0.0
        template = get_template("qwen", engine.hf_tokenizer)
        answer = inference_vllm(engine, template, [{"query": "who are you?"}])
    finally:
        engine.shutdown()
    # The oracle: transformers greedy on tiny-chat itself (same weights, no custom code).
    tokenizer = AutoTokenizer.from_pretrained(TINY_CHAT_DIR)
    ids, _ = get_template("qwen", tokenizer).encode("who are you?")
    model = AutoModelForCausalLM.from_pretrained(TINY_CHAT_DIR, dtype=torch.float32).eval()
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=eos)
    assert answer[0]["response"] == tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
