"""Real model shapes without their weights, for GPU benchmarks and tensor-parallel checks.

    python bench/model_shapes.py qwen2.5-7b-instruct /tmp/qwen7b                 # config + tokenizer
    python bench/model_shapes.py qwen2.5-7b-instruct /tmp/qwen7b --weights 0      # + seeded random weights
    python bench/model_shapes.py qwen2.5-7b-instruct /tmp/qwen7b --adapters 16    # + PEFT adapters

`bench/shapes/<name>/` keeps the real model's config.json. This writes a model folder vLLM and the
lorafleet renderer can load: that config, a synthetic byte-level BPE tokenizer of Qwen2's kind (letter
n-grams; the real special tokens at their real ids) and a ChatML chat template.

Weights: vLLM's `load_format: dummy` is enough for speed, but it seeds every tensor shard alike,
so a TP=4 engine holds other weights than a TP=1 engine. `--weights SEED` writes one seeded random
checkpoint (safetensors) instead, so outputs at different tensor-parallel sizes can be compared.
`--adapters N` writes N random rank-`--rank` LoRA adapters made with peft for that shape.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

SHAPES = Path(__file__).resolve().parent / "shapes"

SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_shape(name: str, out: Path) -> dict:
    """Config files of shape `name` plus a synthetic tokenizer into `out`; returns the config."""
    out.mkdir(parents=True, exist_ok=True)
    for f in (SHAPES / name).iterdir():
        shutil.copy(f, out / f.name)
    config = json.loads((out / "config.json").read_text())
    write_tokenizer(out, config["vocab_size"])
    return config


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE of Qwen2's kind: the 256 bytes, then letter pairs, triples and quadruples
    merged step by step up to the first special id, then the special tokens at their real ids."""
    from itertools import product
    from string import ascii_lowercase

    from tokenizers.pre_tokenizers import ByteLevel
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    first_special = min(SPECIAL_TOKENS.values())
    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []
    for length in (2, 3, 4):
        for letters in product(ascii_lowercase, repeat=length):
            if len(vocab) == first_special:
                break
            word = "".join(letters)
            merges.append((word[:-1], word[-1]))
            vocab[word] = len(vocab)
    assert len(vocab) == first_special and max(SPECIAL_TOKENS.values()) < vocab_size
    vocab |= SPECIAL_TOKENS
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(SPECIAL_TOKENS.values())
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out)


def meta_model(config_dir: Path):
    """The transformers model of that shape on the meta device: names and shapes, no memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def write_random_weights(out: Path, seed: int, std: float = 0.02, shard_bytes: int = 4 << 30) -> None:
    """Seeded N(0, std) weights (norm scales 1) as safetensors shards with an index."""
    import torch
    from safetensors.torch import save_file

    model = meta_model(out)
    tied = model.config.tie_word_embeddings
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shard: dict = {}
    index: dict = {}
    shards: list[dict] = []
    for i, (name, meta) in enumerate(model.state_dict().items()):
        if tied and name == "lm_head.weight":
            continue
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
        if name.endswith("norm.weight"):
            tensor = torch.ones(meta.shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(meta.shape, generator=gen, device=device) * std).to(torch.bfloat16).cpu()
        if shard and sum(t.numel() * 2 for t in shard.values()) + tensor.numel() * 2 > shard_bytes:
            shards.append(shard)
            shard = {}
        shard[name] = tensor
    shards.append(shard)
    total = 0
    for k, part in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, out / fname, metadata={"format": "pt"})
        for name, t in part.items():
            index[name] = fname
            total += t.numel() * 2
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
    )


def write_adapters(
    model_dir: Path, out_root: Path, count: int, rank: int, seed: int = 0, targets=("q_proj", "v_proj")
) -> list[Path]:
    """`count` PEFT LoRA adapters of rank `rank` for the shape in `model_dir`, random and non-zero."""
    import torch
    from peft import LoraConfig, get_peft_model

    paths = []
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False)
    peft_model = get_peft_model(meta_model(model_dir), config)  # once: each adapter only gets new values
    for k in range(count):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + k)
        # The LoRA factors were made on the meta device like the base: give them real values.
        for name, param in list(peft_model.named_parameters()):
            if "lora_" in name:
                owner = peft_model.get_submodule(name.rsplit(".", 1)[0])
                value = torch.randn(param.shape, generator=gen) * 0.05
                owner.weight = torch.nn.Parameter(value.to(torch.bfloat16), requires_grad=False)
        path = out_root / f"lora-{k}"
        peft_model.save_pretrained(path)
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(model_dir)
        (path / "adapter_config.json").write_text(json.dumps(cfg, indent=1))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(p.name for p in SHAPES.iterdir()))
    parser.add_argument("out", type=Path)
    parser.add_argument("--weights", type=int, metavar="SEED", help="write seeded random weights")
    parser.add_argument("--adapters", type=int, default=0, help="write this many LoRA adapters to OUT-adapters/")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    write_shape(args.shape, args.out)
    if args.weights is not None:
        write_random_weights(args.out, args.weights)
    if args.adapters:
        root = args.out.parent / f"{args.out.name}-adapters"
        for p in write_adapters(args.out, root, args.adapters, args.rank):
            print(p)
    print(args.out)


if __name__ == "__main__":
    main()
