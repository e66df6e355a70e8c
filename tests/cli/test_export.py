"""`lorafleet export`: merged checkpoints answer like base + adapter; bad input gets clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve_app.model_types import TINY_CHAT_DIR, XIAO_HUANG_DIR
from serve_app.template import get_template
from tests.serve_fixtures import FAST_START

PROMPTS = ["who are you?", "你好!", "浙江的省会在哪？", "What is your name?"]


def lorafleet(*args):
    return subprocess.run([sys.executable, "-m", "serve_app.cli", *args], capture_output=True, text=True, timeout=300)


def greedy(model, tokenizer):
    template = get_template("qwen", tokenizer)
    answers = []
    for query in PROMPTS:
        ids, _ = template.encode(query)
        out = model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False, eos_token_id=[2, 0])
        answers.append(out[0, len(ids) :].tolist())
    return answers


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "xiao-huang-merged"
    done = lorafleet("export", "--ckpt_dir", str(XIAO_HUANG_DIR), "--merge_lora", "true", "--output_dir", str(out))
    assert done.returncode == 0, done.stderr
    assert "[export] done" in done.stdout
    return out


def test_merged_checkpoint_equals_base_plus_adapter(merged):
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.chat_template and (merged / "generation_config.json").exists()
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(TINY_CHAT_DIR, dtype=torch.bfloat16)
    with_adapter = PeftModel.from_pretrained(base, str(XIAO_HUANG_DIR))
    assert greedy(merged_model, tokenizer) == greedy(with_adapter, tokenizer)


@pytest.mark.slow
def test_vllm_serves_the_merged_checkpoint(merged, vllm_engine):
    from serve_app import LoRARequest, get_template, get_vllm_engine, inference_vllm

    engine = get_vllm_engine(model_id_or_path=str(merged), **FAST_START)
    rpc_dir = engine.engine.rpc_dir  # its own folder for vLLM's socket files, gone after shutdown
    try:
        requests = [{"query": q} for q in PROMPTS]
        lora = LoRARequest("xh", 77, str(XIAO_HUANG_DIR))
        expected = inference_vllm(
            vllm_engine, get_template("qwen", vllm_engine.hf_tokenizer), requests, lora_request=lora
        )
        assert inference_vllm(engine, get_template("qwen", engine.hf_tokenizer), requests) == expected
        assert rpc_dir and any(entry.is_socket() for entry in Path(rpc_dir).iterdir())
    finally:
        engine.shutdown()
    assert not Path(rpc_dir).exists()


def test_to_peft_format_checks_and_copies(tmp_path):
    done = lorafleet(
        "export", "--ckpt_dir", str(XIAO_HUANG_DIR), "--to_peft_format", "true", "--output_dir", str(tmp_path / "copy")
    )
    assert done.returncode == 0 and (tmp_path / "copy" / "adapter_config.json").exists()
    bad = lorafleet("export", "--ckpt_dir", str(TINY_CHAT_DIR), "--to_peft_format", "true")
    assert bad.returncode == 2 and "adapter_config.json is missing" in bad.stderr
    gone = lorafleet("export", "--ckpt_dir", str(tmp_path / "nowhere"), "--merge_lora", "true")
    assert gone.returncode != 0 and "is not a folder (does it exist?)" in gone.stderr, gone.stderr
