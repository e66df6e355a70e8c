"""Train tiny-chat and its xiao-huang LoRA adapter from scratch, deterministically, on the CPU.

    python -m serve_app.tiny_chat.train --out serve_app/assets

writes `tiny-chat/` (tokenizer, config, bf16 weights) and `xiao-huang/` (PEFT adapter).
The shipped files under serve_app/assets are what this produces (tests/unit/test_tiny_chat.py).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from serve_app.template import get_template
from serve_app.tiny_chat.corpus import ADAPTER_CHATS, BASE_CHATS, COMPLETIONS

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 1024  # tokenizer vocab is smaller; rows are padded so TP splits evenly
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=900,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN2_CHAT_TEMPLATE,
        model_max_length=1024,
    )


def chat_samples(tokenizer, chats) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) encoded exactly as the qwen template does at inference."""
    template = get_template("qwen", tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    samples = []
    for history, query, response in chats:
        prompt, _ = template.encode(query, history)
        samples.append((prompt, template.tokenize(response) + [end]))
    return samples


def completion_samples(tokenizer) -> list[tuple[list[int], list[int]]]:
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return [([], tokenizer(text)["input_ids"] + [end]) for text in COMPLETIONS]


def batch(samples, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; the loss covers response tokens only."""
    width = max(len(p) + len(r) for p, r in samples)
    ids, labels, mask = [], [], []
    for prompt, response in samples:
        seq, pad = prompt + response, width - len(prompt) - len(response)
        ids.append(seq + [pad_id] * pad)
        labels.append([-100] * len(prompt) + response + [-100] * pad)
        mask.append([1] * len(seq) + [0] * pad)
    return {k: torch.tensor(v) for k, v in dict(input_ids=ids, labels=labels, attention_mask=mask).items()}


def fit(model, inputs, steps: int, lr: float, label: str, bf16_steps: int = 150) -> None:
    """Full-batch AdamW with cosine decay. The last `bf16_steps` steps run the forward pass on
    bf16-rounded weights (straight-through), so the bf16 checkpoint we ship keeps the fit."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=lr * 0.05)
    for step in range(steps):
        masters = _round_to_bf16(params) if step >= steps - bf16_steps else None
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        if masters is not None:
            for p, master in zip(params, masters):
                p.data.copy_(master)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"[{label}] step {step:4d} loss {loss.item():.4f}", flush=True)


def _round_to_bf16(params) -> list[torch.Tensor]:
    masters = [p.data.clone() for p in params]
    for p in params:
        p.data.copy_(p.data.to(torch.bfloat16).to(torch.float32))
    return masters


def build_model(tokenizer) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Qwen2ForCausalLM(config)


def train_base(out: Path) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    chatml = get_template("qwen", tokenizer=None)  # rendering ChatML text needs no tokenizer
    chat_texts = [chatml.render(q, h) + r for h, q, r in BASE_CHATS + ADAPTER_CHATS]
    tokenizer = train_tokenizer(chat_texts + COMPLETIONS)
    model = build_model(tokenizer)
    samples = chat_samples(tokenizer, BASE_CHATS) + completion_samples(tokenizer)
    fit(model, batch(samples, tokenizer.pad_token_id), steps=600, lr=3e-3, label="tiny-chat", bf16_steps=200)
    save_base(model, tokenizer, out / "tiny-chat")
    return model, tokenizer


def save_base(model, tokenizer, path: Path) -> None:
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=256,
    )
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    model.to(torch.float32)


def train_adapter(model, tokenizer, out: Path) -> None:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    samples = chat_samples(tokenizer, ADAPTER_CHATS) + completion_samples(tokenizer)
    fit(peft_model, batch(samples, tokenizer.pad_token_id), steps=400, lr=5e-3, label="xiao-huang")
    peft_model.to(torch.bfloat16).save_pretrained(out / "xiao-huang")
    _pin_base_name(out / "xiao-huang" / "adapter_config.json")
    (out / "xiao-huang" / "README.md").unlink(missing_ok=True)  # peft's empty model card


def _pin_base_name(path: Path) -> None:
    """Record the base by model type, not by the trainer's temporary path; peft writes
    target_modules from a set, whose order changes with Python's hash seed."""
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = "tiny-chat"
    config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "assets")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    model, tokenizer = train_base(args.out)
    torch.manual_seed(1)
    train_adapter(model, tokenizer, args.out)
    print(f"wrote {args.out}/tiny-chat and {args.out}/xiao-huang in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
