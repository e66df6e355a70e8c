"""Make small PEFT adapters for tests (random, non-zero LoRA weights so they change outputs)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from serve_app.model_types import TINY_CHAT_DIR


def make_adapter(
    out: Path, rank: int = 4, seed: int = 0, base_dir: Path = TINY_CHAT_DIR, targets=("q_proj", "v_proj")
) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    _save(model, out, rank, targets)
    return out


def make_foreign_adapter(out: Path) -> Path:
    """An adapter for a Qwen2 model of another width: it must not be accepted for tiny-chat."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
    )
    _save(Qwen2ForCausalLM(config), out, 4, ("q_proj", "v_proj"))
    return out


def _save(model, out: Path, rank: int, targets) -> None:
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(4.0)  # strong enough to change greedy output
    peft_model.save_pretrained(out)
