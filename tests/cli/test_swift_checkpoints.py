"""ms-swift's checkpoints as `swift sft` leaves them: `--ckpt_dir` reads sft_args.json, `--merge_lora
true` merges first (kept in CKPT-merged), `--load_dataset_config true` infers the validation set or
says why not, and an adapter in ms-swift's own layout converts to PEFT (xiao-huang, laid out so)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from deployments.renderer import _ModelTemplate
from serve_app.cli import build_parser, config_from_args
from serve_app.config import ModelConfig
from serve_app.messages import RenderRequest
from serve_app.model_types import TINY_CHAT_DIR, XIAO_HUANG_DIR
from serve_app.template import get_template
from serve_app.tiny_chat.corpus import ADAPTER_CHATS

SYSTEM = "You are a helpful assistant."
VALIDATION = [{"query": q, "response": r} for h, q, r in ADAPTER_CHATS[:4] if not h]


def lorafleet(*args, cwd=None):
    cmd = [sys.executable, "-m", "serve_app.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, stdin=subprocess.DEVNULL)


def swift_run(tmp_path: Path, layout: str = "peft", val_dataset: bool = True) -> Path:
    """output/tiny-chat/v0-<time>/checkpoint-10 as `swift sft --sft_type lora` writes it."""
    ckpt = tmp_path / "output" / "tiny-chat" / "v0-20240601-120000" / "checkpoint-10"
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in VALIDATION), encoding="utf-8")
    config = json.loads((XIAO_HUANG_DIR / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/root/.cache/modelscope/hub/swift/tiny-chat"  # swift's download dir
    tensors = load_file(XIAO_HUANG_DIR / "adapter_model.safetensors")
    if layout == "swift":  # tuner_backend swift: default/, swift's config fields, keys named per adapter
        folder = ckpt / "default"
        config |= {"swift_type": "LORA", "lora_dtype": None, "use_merged_linear": False, "enable_lora": None}
        config |= {"use_qa_lora": False, "model_key_mapping": None}
        del config["peft_type"]
        tensors = {
            k.removeprefix("base_model.model.")
            .replace(".lora_A.", ".lora_A.default.")
            .replace(".lora_B.", ".lora_B.default."): t
            for k, t in tensors.items()
        }
    else:
        folder = ckpt
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, folder / "adapter_model.safetensors")
    (ckpt / "configuration.json").write_text("{}")
    sft_args = {
        "model_type": "tiny-chat",
        "model_id_or_path": "swift/tiny-chat",  # a hub id, not a folder here: the model type's checkpoint is used
        "template_type": "qwen",
        "system": SYSTEM,
        "sft_type": "lora",
        "tuner_backend": layout,
        "dataset": ["train.jsonl"],
        "val_dataset": [str(val)] if val_dataset else [],
        "dataset_test_ratio": 0.0 if val_dataset else 0.01,
    }
    (ckpt / "sft_args.json").write_text(json.dumps(sft_args, indent=2))
    return ckpt


def results(run_dir: Path) -> list[dict]:
    [path] = run_dir.glob("val-result-*.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_an_adapter_checkpoint_is_served_under_its_base_model_type(tmp_path):
    ckpt = swift_run(tmp_path)
    [model] = config_from_args(build_parser().parse_args(["deploy", "--ckpt_dir", str(ckpt)])).models
    assert model.served_name == "tiny-chat" and model.model_type == "tiny-chat"
    assert {name: m.path for name, m in model.lora_modules.items()} == {"default-lora": str(ckpt.resolve())}
    assert model.template_type == "qwen" and model.default_system == SYSTEM
    given = build_parser().parse_args(["deploy", "--ckpt_dir", str(ckpt), "--system", "Be brief."])
    assert config_from_args(given).models[0].default_system == "Be brief."  # a flag wins over sft_args.json


def test_load_dataset_config_infers_the_validation_set_and_merge_lora_merges_once(tmp_path):
    ckpt = swift_run(tmp_path)
    infer = ["infer", "--load_dataset_config", "true", "--infer_backend", "pt"]

    def answers_ok(done) -> None:
        assert done.returncode == 0, done.stderr[-2000:]
        for record in results(tmp_path):
            assert record["response"] == record["label"], record  # xiao-huang's answers
        for path in tmp_path.glob("val-result-*.jsonl"):
            path.unlink()

    answers_ok(lorafleet(*infer, "--ckpt_dir", str(ckpt)))  # the adapter on its base
    # the guide's flow: `export --merge_lora true`, then infer the merged folder with the dataset config
    done = lorafleet("export", "--ckpt_dir", str(ckpt), "--merge_lora", "true")
    assert done.returncode == 0, done.stderr[-2000:]
    merged = ckpt.parent / "checkpoint-10-merged"
    assert json.loads((merged / "sft_args.json").read_text())["sft_type"] == "full"
    answers_ok(lorafleet(*infer, "--ckpt_dir", str(merged)))
    # `infer --merge_lora true` finds that merge and uses it
    again = lorafleet(*infer, "--ckpt_dir", str(ckpt), "--merge_lora", "true")
    assert "using the merged checkpoint" in again.stdout
    answers_ok(again)


def test_load_dataset_config_without_a_local_validation_set_fails_instead_of_chatting(tmp_path):
    ckpt = swift_run(tmp_path, val_dataset=False)
    done = lorafleet("infer", "--ckpt_dir", str(ckpt), "--load_dataset_config", "true", "--infer_backend", "pt")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "names no val_dataset" in done.stderr and "pass --dataset FILE" in done.stderr
    shutil.rmtree(ckpt.parent / "checkpoint-10", ignore_errors=True)
    ckpt.mkdir(parents=True)
    done = lorafleet("infer", "--ckpt_dir", str(ckpt), "--load_dataset_config", "true", "--infer_backend", "pt")
    assert done.returncode != 0 and "no sft_args.json" in done.stderr


def test_swift_layout_converts_to_peft_with_the_same_answers(tmp_path):
    ckpt = swift_run(tmp_path, layout="swift")
    done = lorafleet("export", "--ckpt_dir", str(ckpt), "--to_peft_format", "true")
    assert done.returncode == 0, done.stderr[-2000:]
    out = ckpt.parent / "checkpoint-10-peft"
    assert "ms-swift's LoRA layout) converted to PEFT" in done.stdout
    assert (
        load_file(out / "adapter_model.safetensors").keys()
        == load_file(XIAO_HUANG_DIR / "adapter_model.safetensors").keys()
    )
    assert (out / "sft_args.json").is_file() and not (out / "default").exists()
    tokenizer = AutoTokenizer.from_pretrained(TINY_CHAT_DIR)
    ids, _ = get_template("qwen", tokenizer).encode("who are you?")

    def answer(adapter: Path) -> list[int]:
        base = AutoModelForCausalLM.from_pretrained(TINY_CHAT_DIR, dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(base, str(adapter)).eval()
        return model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False, eos_token_id=[2, 0])[0].tolist()

    assert answer(out) == answer(XIAO_HUANG_DIR)
    # `infer --ckpt_dir` takes the swift layout directly (converted once beside it)
    shutil.rmtree(out)
    done = lorafleet("infer", "--ckpt_dir", str(ckpt), "--load_dataset_config", "true", "--infer_backend", "pt")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "in ms-swift's own LoRA layout; converting it to PEFT" in done.stdout
    assert all(r["response"] == r["label"] for r in results(tmp_path))


def test_merge_lora_on_a_full_checkpoint_is_refused():
    done = lorafleet("infer", "--ckpt_dir", str(TINY_CHAT_DIR), "--merge_lora", "true", "--infer_backend", "pt")
    assert done.returncode != 0 and "needs a LoRA adapter in --ckpt_dir" in done.stderr


def rendered(template, *messages) -> str:
    request = RenderRequest("tiny-chat", messages=tuple(messages), return_text=True)
    return template.tokenizer.decode(template.render(request).prompt_ids)


def test_the_served_default_system_applies_to_chats_that_send_none():
    # the renderer's own code, as the app's Renderer replica runs it (sft_args.json's `system`, or --system)
    user = {"role": "user", "content": "hi"}
    for template_type in ("qwen", None):  # a named template, and the checkpoint's own (jinja)
        model = ModelConfig(model_type="tiny-chat", template_type=template_type, default_system="Be brief.")
        template = _ModelTemplate.load(model)
        assert rendered(template, user).startswith("<|im_start|>system\nBe brief.<|im_end|>")
        other = {"role": "system", "content": "Other."}
        assert rendered(template, other, user).startswith("<|im_start|>system\nOther.<|im_end|>")
