"""Train tiny-chat and its xiao-huang LoRA adapter from scratch, deterministically, on the CPU.

    python -m serve_app.tiny_chat.train --out serve_app/assets

writes `tiny-chat/` (tokenizer, config, bf16 weights), `xiao-huang/` (PEFT adapter) and
`trained_on.json` (the machine's fingerprint, since float bits depend on the CPU's kernels, and the
losses and weight probes of the first FIRST_STEPS steps, which the suite retrains and compares).
tests/engine/test_tiny_chat_training.py checks that retraining reproduces the shipped files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from serve_app.template import get_template, template_messages
from serve_app.tiny_chat.corpus import ADAPTER_CHATS, BASE_CHATS, COMPLETIONS, TOOL_CHATS

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 1024  # tokenizer vocab is smaller; rows are padded so TP splits evenly
# ChatML plus Qwen2.5's tool-call format; without tools it renders what the `qwen` template renders.
CHAT_TEMPLATE = (Path(__file__).resolve().parent / "chat_template.jinja").read_text(encoding="utf-8")
TRAINED_ON = Path(__file__).resolve().parent.parent / "assets" / "trained_on.json"
# The two phases' schedules: full-batch steps, peak learning rate, and how many final steps run on
# bf16-rounded weights. first_steps_trace records them beside the losses it measures.
PHASES = {
    "tiny-chat": {"steps": 600, "lr": 3e-3, "bf16_steps": 200},
    "xiao-huang": {"steps": 400, "lr": 5e-3, "bf16_steps": 150},
}
# Steps of each phase that the test suite retrains and compares with the record. Training is chaotic:
# runs that differ only in float rounding (another CPU's kernels, emulated with ATEN_CPU_CAPABILITY=
# default) agree to 3e-6 in loss for the base's first 12 steps, then part (17% apart by step 36).
# The adapter parts sooner (Adam's first steps move every LoRA weight by about lr, in the direction
# of a gradient that is near zero for many of them): 1e-4 for 3 steps, 2e-3 by the 4th.
FIRST_STEPS = {"tiny-chat": 12, "xiao-huang": 3}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# Qwen2's pre-tokenizer split (each digit alone). transformers loads a checkpoint whose config says
# qwen2 with its Qwen2Tokenizer, which applies this split whatever tokenizer.json says; training
# with the same split makes the ids the model learns the ids every engine feeds it.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
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
        chat_template=CHAT_TEMPLATE,
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


def tool_samples(tokenizer) -> list[tuple[list[int], list[int]]]:
    """Tool-calling chats, rendered by the checkpoint's own chat template as the server renders them."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    samples = []
    for tools, messages, reply in TOOL_CHATS:
        prompt, full = _tool_chat_texts(tokenizer.apply_chat_template, tools, messages, reply)
        response = full[len(prompt) :].removesuffix("<|im_end|>\n")
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        samples.append((encode(prompt), encode(response) + [end]))
    return samples


def _tool_chat_texts(apply_chat_template, tools, messages, reply) -> tuple[str, str]:
    """(prompt, prompt + reply) as text; `apply_chat_template` is a tokenizer's, or `_render` before one exists."""
    prompt = apply_chat_template(template_messages(messages), tools=tools, add_generation_prompt=True, tokenize=False)
    return prompt, apply_chat_template(template_messages([*messages, reply]), tools=tools, tokenize=False)


def _render(messages, tools, add_generation_prompt=False, tokenize=False) -> str:
    """CHAT_TEMPLATE rendered without a tokenizer (the tokenizer is trained on these texts)."""
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value: json.dumps(value, ensure_ascii=False)
    return env.from_string(CHAT_TEMPLATE).render(
        messages=messages, tools=tools, add_generation_prompt=add_generation_prompt
    )


def completion_samples(tokenizer) -> list[tuple[list[int], list[int]]]:
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return [([], tokenizer(text)["input_ids"] + [end]) for text in COMPLETIONS]


def batches(samples, pad_id: int, bucket: int = 128) -> list[dict[str, torch.Tensor]]:
    """The full batch in two parts, samples up to `bucket` tokens and longer ones, so that the short
    chats are not padded to the length of the tool-calling ones (a third of the compute)."""
    short = [s for s in samples if len(s[0]) + len(s[1]) <= bucket]
    long = [s for s in samples if len(s[0]) + len(s[1]) > bucket]
    return [batch(part, pad_id) for part in (short, long) if part]


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


def fit(
    model, inputs: list[dict], steps: int, lr: float, label: str, bf16_steps: int, stop_after: int | None = None
) -> list[float]:
    """Full-batch AdamW with cosine decay. The last `bf16_steps` steps run the forward pass on
    bf16-rounded weights (straight-through), so the bf16 checkpoint we ship keeps the fit.
    `stop_after` ends it early on the same schedule. Returns the loss of every step run."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=lr * 0.05)
    losses = []
    for step in range(min(steps, stop_after or steps)):
        masters = _round_to_bf16(params) if step >= steps - bf16_steps else None
        loss = full_batch_loss(model, inputs)
        optimizer.zero_grad()
        loss.backward()
        if masters is not None:
            for p, master in zip(params, masters):
                p.data.copy_(master)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"[{label}] step {step:4d} loss {losses[-1]:.4f}", flush=True)
    return losses


def full_batch_loss(model, parts: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean loss over every response token of all parts, as if they were one batch."""
    counts = [int((part["labels"][:, 1:] != -100).sum()) for part in parts]
    total = sum(model(**part).loss * count for part, count in zip(parts, counts))
    return total / sum(counts)


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


def corpus_texts() -> list[str]:
    """Every text of the corpus as the model sees it: the tokenizer's training data."""
    chatml = get_template("qwen", tokenizer=None)  # rendering ChatML text needs no tokenizer
    chat_texts = [chatml.render(q, h) + r for h, q, r in BASE_CHATS + ADAPTER_CHATS]
    tool_texts = [_tool_chat_texts(_render, *chat)[1] for chat in TOOL_CHATS]
    return chat_texts + tool_texts + COMPLETIONS


def train_base(out: Path, stop_after: int | None = None) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast, list]:
    tokenizer = train_tokenizer(corpus_texts())
    model = build_model(tokenizer)
    samples = chat_samples(tokenizer, BASE_CHATS) + tool_samples(tokenizer) + completion_samples(tokenizer)
    inputs = batches(samples, tokenizer.pad_token_id)
    losses = fit(model, inputs, label="tiny-chat", stop_after=stop_after, **PHASES["tiny-chat"])
    save_base(model, tokenizer, out / "tiny-chat")
    return model, tokenizer, losses


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


def train_adapter(model, tokenizer, out: Path, stop_after: int | None = None) -> list[float]:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    samples = chat_samples(tokenizer, ADAPTER_CHATS) + tool_samples(tokenizer) + completion_samples(tokenizer)
    inputs = batches(samples, tokenizer.pad_token_id)
    losses = fit(peft_model, inputs, label="xiao-huang", stop_after=stop_after, **PHASES["xiao-huang"])
    peft_model.to(torch.bfloat16).save_pretrained(out / "xiao-huang")
    _pin_base_name(out / "xiao-huang" / "adapter_config.json")
    (out / "xiao-huang" / "README.md").unlink(missing_ok=True)  # peft's empty model card
    return losses


def weight_probes(tensors: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per tensor: its L2 norm and its dot products with 3 fixed random sign vectors. Two checkpoints
    whose probes differ by d * norm differ by about d in relative L2 distance; a short record
    of a checkpoint that the suite compares against instead of shipping the checkpoint."""
    probes = {}
    for name, tensor in sorted(tensors.items()):
        flat = tensor.detach().float().flatten()
        signs = torch.randint(0, 2, (3, flat.numel()), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
        probes[name] = [float(torch.linalg.vector_norm(flat))] + [float(v) for v in signs @ flat]
    return probes


def first_steps_trace(out: Path, steps: dict[str, int]) -> dict:
    """Train the first `steps[phase]` steps of each phase on the full schedules: losses and weight probes."""
    from safetensors.torch import load_file

    model, tokenizer, base_losses = train_base(out, stop_after=steps["tiny-chat"])
    torch.manual_seed(1)
    adapter_losses = train_adapter(model, tokenizer, out, stop_after=steps["xiao-huang"])
    return {
        "steps": steps,
        "phases": PHASES,
        "tiny-chat": {"loss": base_losses, "probes": weight_probes(load_file(out / "tiny-chat/model.safetensors"))},
        "xiao-huang": {
            "loss": adapter_losses,
            "probes": weight_probes(load_file(out / "xiao-huang/adapter_model.safetensors")),
        },
    }


def _pin_base_name(path: Path) -> None:
    """Record the base by model type, not by the trainer's temporary path; peft writes
    target_modules from a set, whose order changes with Python's hash seed."""
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = "tiny-chat"
    config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def machine_fingerprint() -> dict:
    """What decides the float bits of training here: the CPU (model and instruction sets, which pick
    the kernels), torch's version and its thread count (the summation order)."""
    info = {}
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    flags = " ".join(sorted(info.get("flags", "").split()))
    return {
        "cpu": info.get("model name", platform.processor()),
        "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def write_record(path: Path) -> None:
    """What the suite checks a retraining against: this machine, and the first steps' trace."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        torch.manual_seed(0)  # as main() seeds the whole training
        trace = first_steps_trace(Path(scratch), FIRST_STEPS)
    path.write_text(json.dumps({"machine": machine_fingerprint(), "first_steps": trace}, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "assets")
    parser.add_argument(
        "--first-steps",
        action="store_true",
        help="train only the first FIRST_STEPS steps of each phase; write first_steps.json (losses, weight probes)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    if args.first_steps:
        trace = first_steps_trace(args.out, FIRST_STEPS)
        (args.out / "first_steps.json").write_text(json.dumps(trace, indent=1) + "\n")
        print(f"wrote {args.out}/first_steps.json in {time.perf_counter() - started:.0f} s")
        return
    model, tokenizer, _ = train_base(args.out)
    torch.manual_seed(1)
    train_adapter(model, tokenizer, args.out)
    write_record(args.out / "trained_on.json")
    print(f"wrote {args.out}/tiny-chat and {args.out}/xiao-huang in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
