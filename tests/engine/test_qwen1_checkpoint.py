"""Qwen(1) checkpoints (qwen-7b-chat's layout, which vLLM no longer loads) are converted to Qwen2 and
answer as the model they hold: built here from tiny-chat's weights by the inverse mapping."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from serve_app import ModelType, get_vllm_engine
from serve_app.errors import ConfigError
from serve_app.model_types import TINY_CHAT_DIR
from serve_app.qwen1_convert import convert
from serve_app.tiny_chat.answers import chat_prompts
from serve_app.tiny_chat.corpus import BASE_CHATS
from tests.engine.test_oracle import PROMPTS, eos_ids, hf_greedy, prompt_ids, vllm_greedy
from tests.qwen1_checkpoint import qwen1_ids, write_qwen1_adapter, write_qwen1_checkpoint
from tests.serve_fixtures import FAST_START

pytestmark = pytest.mark.slow
README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def qwen1_dir(tmp_path_factory):
    return write_qwen1_checkpoint(tmp_path_factory.mktemp("hub") / "Qwen-tiny-chat")


def in_qwen1_ids(sequences: list[list[int]]) -> list[list[int]]:
    _, new_id = qwen1_ids()
    return [[new_id[t] for t in seq] for seq in sequences]


def test_loaded_by_path_it_is_converted_once_and_answers_like_tiny_chat(
    vllm_engine, qwen1_dir, tmp_path, monkeypatch, capsys
):
    from serve_app.offline import GenerationConfig, inference_vllm
    from serve_app.template import get_template

    monkeypatch.setenv("LORAFLEET_CONVERTED_DIR", str(tmp_path / "converted"))
    engine = get_vllm_engine(ModelType.qwen_7b_chat, model_id_or_path=str(qwen1_dir), max_model_len=512, **FAST_START)
    try:
        assert "is a Qwen(1) checkpoint (QWenLMHeadModel)" in capsys.readouterr().out
        [converted] = [p for p in (tmp_path / "converted").iterdir() if p.is_dir()]
        assert engine.model_dir == str(converted)
        # the same prompt ids (in Qwen(1)'s numbering), by its own chat template too, and the same greedy tokens
        ids = prompt_ids(engine.hf_tokenizer)
        own = get_template("jinja", engine.hf_tokenizer)
        assert [own.encode(q, h)[0] for q, h in PROMPTS] == ids
        assert ids == in_qwen1_ids(prompt_ids(vllm_engine.hf_tokenizer))
        assert vllm_greedy(engine, ids) == in_qwen1_ids(vllm_greedy(vllm_engine, prompt_ids(vllm_engine.hf_tokenizer)))
        # and every chat of the corpus answered alike through the ms-swift API
        config = GenerationConfig(max_new_tokens=128, temperature=0.0)
        requests = chat_prompts(BASE_CHATS)
        got = inference_vllm(engine, get_template("qwen", engine.hf_tokenizer), requests, generation_config=config)
        want = inference_vllm(
            vllm_engine, get_template("qwen", vllm_engine.hf_tokenizer), requests, generation_config=config
        )
        assert [r["response"] for r in got] == [r["response"] for r in want]
    finally:
        engine.shutdown()
    # a second load finds the conversion made
    from serve_app.model_types import resolve_model_dir

    assert resolve_model_dir(ModelType.qwen_7b_chat, str(qwen1_dir)) == str(converted)
    assert "converting" not in capsys.readouterr().out


def test_readme_export_to_qwen2_writes_a_checkpoint_transformers_loads(vllm_engine, qwen1_dir, tmp_path):
    shutil.copytree(qwen1_dir, tmp_path / "Qwen-7B-Chat")
    [line] = [line for line in README.splitlines() if "--to_qwen2 true" in line]  # run as written, from here
    command = line.split("#")[0].replace(".venv/bin/lorafleet", str(Path(sys.executable).with_name("lorafleet")))
    done = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "Qwen-7B-Chat-qwen2"
    assert "[export] done: Qwen-7B-Chat-qwen2 (Qwen2 layout)" in done.stdout
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    tiny = AutoModelForCausalLM.from_pretrained(TINY_CHAT_DIR, dtype=torch.bfloat16).eval()
    tokenizer = vllm_engine.hf_tokenizer
    ids = prompt_ids(tokenizer)
    stops = in_qwen1_ids([eos_ids(vllm_engine)])[0]
    assert hf_greedy(converted, in_qwen1_ids(ids), stops) == in_qwen1_ids(hf_greedy(tiny, ids, eos_ids(vllm_engine)))
    again = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "exists and is not empty" in again.stderr


def test_bad_checkpoints_get_clear_errors_and_leave_nothing(qwen1_dir, tmp_path):
    with pytest.raises(ConfigError, match="is not a Qwen\\(1\\) checkpoint"):
        convert(TINY_CHAT_DIR, tmp_path / "out")
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in qwen1_dir.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    tensors = load_file(broken / "model-00001-of-00001.safetensors")
    # the rotary frequencies some Qwen(1) revisions saved are skipped; a tensor it does not know is refused
    extra = {
        "transformer.h.0.attn.rotary_emb.inv_freq": torch.ones(32),
        "transformer.h.0.attn.gate.weight": torch.ones(2),
    }
    save_file({**tensors, **extra}, broken / "model-00001-of-00001.safetensors")
    with pytest.raises(ConfigError, match="unexpected tensor 'transformer.h.0.attn.gate.weight'"):
        convert(broken, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no output, no partial folder
    base_model = tmp_path / "base"  # Qwen-7B (not -Chat): generation_config says chat_format raw
    base_model.mkdir()
    for file in qwen1_dir.iterdir():
        (base_model / file.name).write_bytes(file.read_bytes())
    generation = json.loads((base_model / "generation_config.json").read_text()) | {"chat_format": "raw"}
    (base_model / "generation_config.json").write_text(json.dumps(generation))
    converted = convert(base_model, tmp_path / "base-qwen2")
    assert not (converted / "chat_template.jinja").exists()
    assert json.loads((converted / "tokenizer_config.json").read_text()).get("chat_template") is None
    (broken / "qwen.tiktoken").unlink()
    with pytest.raises(ConfigError, match="has no qwen.tiktoken"):
        convert(broken, tmp_path / "out")


def test_a_served_config_accepts_it_without_trusting_its_code(qwen1_dir):
    # its auto_map names code that never runs: the converted checkpoint is what gets loaded
    from serve_app.config import ModelConfig

    model = ModelConfig(model_type="qwen-7b-chat", model_id_or_path=str(qwen1_dir))
    assert model.engine.trust_remote_code is False


def test_an_adapter_of_the_qwen1_checkpoint_is_converted_and_merged_like_xiao_huang(qwen1_dir, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from serve_app.model_types import XIAO_HUANG_DIR, resolve_model_dir
    from serve_app.qwen1_convert import servable_adapter

    monkeypatch.setenv("LORAFLEET_CONVERTED_DIR", str(tmp_path / "converted"))
    adapter = write_qwen1_adapter(tmp_path / "qwen1-lora")  # targets c_attn, c_proj, w1, w2
    converted = servable_adapter(str(adapter))
    targets = json.loads((Path(converted) / "adapter_config.json").read_text())["target_modules"]
    assert targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    tokenizer = AutoTokenizer.from_pretrained(TINY_CHAT_DIR)
    ids, stops = prompt_ids(tokenizer), [2, 0]

    def with_adapter(base_dir, adapter_dir):
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
        return PeftModel.from_pretrained(base, str(adapter_dir)).eval()

    want = in_qwen1_ids(hf_greedy(with_adapter(TINY_CHAT_DIR, XIAO_HUANG_DIR), ids, stops))
    base = resolve_model_dir(ModelType.qwen_7b_chat, str(qwen1_dir))
    qwen1_stops = in_qwen1_ids([stops])[0]
    assert hf_greedy(with_adapter(base, converted), in_qwen1_ids(ids), qwen1_stops) == want
    # `export --merge_lora true`, as for any adapter: the merged checkpoint answers alike
    cmd = [sys.executable, "-m", "serve_app.cli", "export", "--ckpt_dir", str(adapter), "--merge_lora", "true"]
    cmd += ["--model_type", "qwen-7b-chat", "--model_id_or_path", str(qwen1_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen1-lora-merged", dtype=torch.bfloat16).eval()
    assert hf_greedy(merged, in_qwen1_ids(ids), qwen1_stops) == want
