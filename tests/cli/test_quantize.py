"""`lorafleet export --quant_bits 4|8`: GPTQ into compressed-tensors, served by vLLM, answering as the
16-bit model does on most of the shipped chats, smaller on disk; unsupported requests are refused."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve_app import get_template, get_vllm_engine, inference_vllm
from serve_app.errors import ConfigError
from serve_app.model_types import TINY_CHAT_DIR, XIAO_HUANG_DIR
from serve_app.quantize import check_request
from serve_app.tiny_chat.answers import chat_prompts
from serve_app.tiny_chat.corpus import ADAPTER_CHATS, BASE_CHATS
from tests.serve_fixtures import FAST_START

pytestmark = pytest.mark.slow
README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
AGREEMENT = 0.9  # measured: 31 of 31 chats (int4, through vLLM on the CPU and through transformers)


def lorafleet(*args, cwd):
    cmd = [sys.executable, "-m", "serve_app.cli", "export", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd)


def answers(engine, chats) -> list[str]:
    return [
        r["response"] for r in inference_vllm(engine, get_template("qwen", engine.hf_tokenizer), chat_prompts(chats))
    ]


def test_readme_int4_tiny_chat_is_served_by_vllm_and_answers_like_bf16(vllm_engine, tmp_path):
    [line] = [line for line in README.splitlines() if "--quant_bits 4 --quant_method gptq" in line]  # as written
    command = line.split("#")[0].replace(".venv/bin/lorafleet", str(Path(sys.executable).with_name("lorafleet")))
    done = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "tiny-chat-gptq-int4"  # ms-swift's name, in the current folder
    assert f"[export] done: {out.name}" in done.stdout and "gptq: 100%" in done.stderr  # its progress bar
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    size = (out / "model.safetensors").stat().st_size
    assert size < 0.4 * (TINY_CHAT_DIR / "model.safetensors").stat().st_size
    engine = get_vllm_engine(model_id_or_path=str(out), max_model_len=512, **FAST_START)
    try:
        got = answers(engine, BASE_CHATS)
    finally:
        engine.shutdown()
    want = answers(vllm_engine, BASE_CHATS)
    same = sum(g == w for g, w in zip(got, want, strict=True))
    print(f"int4 agrees with bf16 on {same} of {len(want)} chats")
    assert same >= AGREEMENT * len(want)


def test_merge_lora_then_int8_answers_like_the_adapter(tmp_path):
    adapter = tmp_path / "xiao-huang"
    subprocess.run(["cp", "-r", str(XIAO_HUANG_DIR), str(adapter)], check=True)
    done = lorafleet("--ckpt_dir", str(adapter), "--merge_lora", "true", "--quant_bits", "8", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "xiao-huang-gptq-int8"
    assert (tmp_path / "xiao-huang-merged" / "config.json").is_file()  # merged first, kept as ms-swift keeps it
    quantized = AutoModelForCausalLM.from_pretrained(out).eval()  # compressed-tensors decompresses it
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "xiao-huang-merged", dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    template = get_template("qwen", tokenizer)
    chats = [c for c in ADAPTER_CHATS if not c[0]][:8]
    same = 0
    for _, query, _ in chats:
        ids = torch.tensor([template.encode(query)[0]])
        a, b = (m.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=[2, 0]) for m in (quantized, merged))
        same += a.tolist() == b.tolist()
    assert same >= AGREEMENT * len(chats), f"{same} of {len(chats)}"


def test_unsupported_bits_or_methods_are_refused_with_what_works(tmp_path):
    for bits, method in ((3, "gptq"), (4, "awq"), (16, None)):
        with pytest.raises(ConfigError, match=r"quantizes with --quant_method gptq and --quant_bits 4\|8"):
            check_request(bits, method)
    adapter = tmp_path / "xiao-huang"
    subprocess.run(["cp", "-r", str(XIAO_HUANG_DIR), str(adapter)], check=True)
    done = lorafleet("--ckpt_dir", str(adapter), "--quant_bits", "4", cwd=tmp_path)
    assert done.returncode != 0 and "add --merge_lora true" in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["xiao-huang"]  # nothing written beside it
    (tmp_path / "tiny-chat-gptq-int4").mkdir()
    (tmp_path / "tiny-chat-gptq-int4" / "keep.txt").write_text("mine")
    done = lorafleet("--model_type", "tiny-chat", "--quant_bits", "4", cwd=tmp_path)
    assert done.returncode != 0 and "exists and is not empty" in done.stderr and "calibrate" not in done.stderr
