"""Qwen(1) checkpoints (`QWenLMHeadModel`: qwen-7b-chat, qwen-7b) in the Qwen2 layout vLLM serves.

vLLM dropped Qwen(1)'s architecture, and its tokenizer is a tiktoken file read by the checkpoint's
own Python code. The two models compute the same function: Qwen(1)'s fused `c_attn` is Qwen2's
q/k/v projections with biases, its MLP `c_proj(w1(x) * silu(w2(x)))` is Qwen2's
`down(up(x) * silu(gate(x)))`, its RMSNorms and rotary embedding are Qwen2's, and its tiktoken
vocabulary is a byte-level BPE whose merges follow from the ranks. So the conversion renames and
splits tensors, and writes the same vocabulary (same ids, same special tokens) as a `transformers`
fast tokenizer. Qwen(1)'s dynamic-NTK and log-n attention only act beyond `seq_length`, which becomes
the converted model's `max_position_embeddings`.

`servable_dir(path)` converts once, into `<state dir>/converted/`, when a checkpoint is loaded;
`lorafleet export --to_qwen2` converts into a folder of the user's choice.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from serve_app.errors import ConfigError
from serve_app.folders import complete_or_nothing

ARCHITECTURE = "QWenLMHeadModel"
TIKTOKEN_FILE = "qwen.tiktoken"
# Qwen(1)'s tokenization_qwen.py: the pre-tokenizer split, and the special tokens that follow the
# ranked vocabulary in this order.
SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
# ChatML, as the `qwen` template renders it, so the converted folder also chats by path alone.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SHARD_BYTES = 4 << 30


def is_qwen1(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return ARCHITECTURE in (json.loads(config.read_text()).get("architectures") or [])


def servable_dir(path: str, log=print) -> str:
    """`path`, or for a Qwen(1) checkpoint its Qwen2 conversion (made once, then reused)."""
    if not is_qwen1(path):
        return path
    why = f"a Qwen(1) checkpoint ({ARCHITECTURE}), which vLLM no longer serves; converting it once to the Qwen2 layout"
    return _converted_once(path, "config.json", convert, f"[lorafleet] {path} is {why}", log)


def _converted_once(path: str, marker: str, converter, message: str, log) -> str:
    """The cached conversion of `path` (done `out` holds `marker`), made by `converter(path, out)`
    the first time, once per node even when several replicas ask at once."""
    out = _cache_root() / f"{Path(path).name}-qwen2-{_fingerprint(Path(path))}"
    if (out / marker).exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another replica on this node may be converting it
        if not (out / marker).exists():
            log(f"{message} in {out}")
            converter(path, out)
    return str(out)


def convert(src: str | Path, out: str | Path) -> Path:
    """Write the Qwen2 form of the Qwen(1) checkpoint `src` into `out` (complete, or not at all)."""
    src, out = Path(src), Path(out)
    if not is_qwen1(src):
        raise ConfigError(f"'{src}' is not a Qwen(1) checkpoint (config.json architectures is not [{ARCHITECTURE}]).")
    if not (src / TIKTOKEN_FILE).is_file():
        raise ConfigError(f"'{src}' has no {TIKTOKEN_FILE}: a Qwen(1) checkpoint's vocabulary is needed to convert it.")
    config = json.loads((src / "config.json").read_text())
    with complete_or_nothing(out) as partial:  # a reader sees the whole folder or none of it
        tokenizer = write_tokenizer(src / TIKTOKEN_FILE, config["vocab_size"], partial, chatml=is_chat(src))
        dtype = write_weights(src, partial)
        write_configs(src, config, tokenizer, dtype, partial)
    return out


# --- tokenizer ------------------------------------------------------------------------------------


def read_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken file: one `base64(token bytes) rank` per line."""
    ranks = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def byte_chars() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table, which tokenizers' ByteLevel
    uses): printable Latin-1 bytes stand for themselves, the rest map to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts tiktoken joins last to make `token`: its BPE with only lower-ranked merges."""
    parts = [bytes([b]) for b in token]
    limit = ranks[token]
    while len(parts) > 2:
        pairs = [(r, i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if (r := ranks.get(a + b, limit)) < limit]
        if not pairs:
            raise ConfigError(
                f"token {token!r} (rank {limit}) cannot be built from lower-ranked tokens; not a BPE vocabulary."
            )
        _, i = min(pairs)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def is_chat(src: Path) -> bool:
    """Qwen(1) marks its chat checkpoints in generation_config.json (`chat_format: chatml`; the base
    model's is `raw`): only those get a chat template, so a base model is not chatted with."""
    path = src / "generation_config.json"
    return path.is_file() and json.loads(path.read_text()).get("chat_format") == "chatml"


def write_tokenizer(tiktoken_file: Path, vocab_size: int, out: Path, chatml: bool):
    """The tiktoken vocabulary as a byte-level BPE `tokenizer.json` with the same ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ranks = read_ranks(tiktoken_file)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ConfigError(f"{tiktoken_file}: ranks are not 0..{len(ranks) - 1}; not a Qwen(1) vocabulary.")
    byte_char = byte_chars()

    def text(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    by_rank = sorted((rank, token) for token, rank in ranks.items() if len(token) > 1)
    merges = [tuple(text(part) for part in merge_of(token, ranks)) for _, token in by_rank]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer = normalizers.NFC()  # Qwen(1)'s tokenizer NFC-normalises text before encoding
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [t for i, t in enumerate(SPECIAL_TOKENS) if len(ranks) + i < vocab_size]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE if chatml else None,
    )
    tokenizer.save_pretrained(out)
    return tokenizer


# --- weights --------------------------------------------------------------------------------------


def qwen2_tensors(name: str, tensor) -> Iterator[tuple[str, object]]:
    """Qwen2's tensors for one Qwen(1) tensor."""
    if name.endswith("rotary_emb.inv_freq"):  # saved by some Qwen(1) revisions; derived from rope_theta
        return
    if name in _TOP_NAMES:
        yield _TOP_NAMES[name], tensor
        return
    if name.startswith("transformer.h."):
        layer, rest = name[len("transformer.h.") :].split(".", 1)
        prefix = f"model.layers.{layer}."
        if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
            kind = rest.rsplit(".", 1)[1]
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                yield f"{prefix}self_attn.{proj}.{kind}", part.contiguous()
            return
        if rest in _LAYER_NAMES:
            yield prefix + _LAYER_NAMES[rest], tensor
            return
    raise ConfigError(f"unexpected tensor '{name}' in a Qwen(1) checkpoint; not converted.")


_TOP_NAMES = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.w1.weight": "mlp.up_proj.weight",  # Qwen(1): c_proj(w1(x) * silu(w2(x)))
    "mlp.w2.weight": "mlp.gate_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}


def source_tensors(src: Path) -> Iterator[tuple[str, object]]:
    """Every tensor of the checkpoint, one at a time (safetensors, else PyTorch .bin files)."""
    import torch
    from safetensors import safe_open

    files = sorted(src.glob("*.safetensors"))
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    if not files:
        bins = sorted(src.glob("pytorch_model*.bin"))
        if not bins:
            raise ConfigError(f"'{src}' has no weights (*.safetensors or pytorch_model*.bin).")
        for file in bins:
            yield from torch.load(file, map_location="cpu", weights_only=True).items()


def write_weights(src: Path, out: Path) -> str:
    """Converted tensors in safetensors shards of at most SHARD_BYTES, each written as it fills
    (one shard in memory at a time); returns their dtype."""
    from safetensors.torch import save_file

    shard, shard_bytes, files, weight_map, dtype = {}, 0, [], {}, None

    def flush():
        files.append(out / f"shard-{len(files) + 1}.safetensors")
        save_file(shard, files[-1], metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, len(files) - 1))

    for name, tensor in source_tensors(src):
        for new_name, new in qwen2_tensors(name, tensor):
            if shard and shard_bytes + new.nbytes > SHARD_BYTES:
                flush()
                shard, shard_bytes = {}, 0
            shard[new_name], shard_bytes = new, shard_bytes + new.nbytes
            dtype = dtype or str(new.dtype).removeprefix("torch.")
    flush()
    names = (
        ["model.safetensors"]
        if len(files) == 1
        else [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    )
    for file, name in zip(files, names, strict=True):
        file.rename(out / name)
    if len(files) > 1:
        index = {"metadata": {}, "weight_map": {k: names[i] for k, i in sorted(weight_map.items())}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return dtype or "bfloat16"


def write_configs(src: Path, config: dict, tokenizer, dtype: str, out: Path) -> None:
    heads = config["num_attention_heads"]
    qwen2 = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"] // 2,  # Qwen(1) states w1 and w2 together
        "num_hidden_layers": config["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": config.get("kv_channels", config["hidden_size"] // heads),
        "hidden_act": "silu",
        "rms_norm_eps": config.get("layer_norm_epsilon", 1e-6),
        "rope_theta": float(config.get("rotary_emb_base", 10000)),  # transformers 4 (vLLM 0.25's)
        "rope_parameters": {"rope_theta": float(config.get("rotary_emb_base", 10000)), "rope_type": "default"},
        "max_position_embeddings": config.get("seq_length") or config.get("max_position_embeddings", 2048),
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "torch_dtype": dtype,
        "dtype": dtype,
        "converted_from": f"{ARCHITECTURE} ({src.name})",
    }
    (out / "config.json").write_text(json.dumps(qwen2, indent=2) + "\n")
    stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    generation = (
        json.loads((src / "generation_config.json").read_text()) if (src / "generation_config.json").exists() else {}
    )
    generation = {
        k: v for k, v in generation.items() if k not in ("stop_words_ids", "chat_format", "transformers_version")
    }
    generation.update(eos_token_id=stops, pad_token_id=stops[1], bos_token_id=stops[1])
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


# --- cache ----------------------------------------------------------------------------------------


def _cache_root() -> Path:
    from serve_app.config import default_state_dir

    return Path(os.environ.get("LORAFLEET_CONVERTED_DIR") or Path(default_state_dir()) / "converted")


def _fingerprint(src: Path) -> str:
    """Changes when any file of the checkpoint does (path, size, modification time)."""
    digest = hashlib.sha256(str(src.resolve()).encode())
    for file in sorted(p for p in src.iterdir() if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


# --- LoRA adapters trained on a Qwen(1) checkpoint --------------------------------------------------

# A Qwen(1) module name -> the Qwen2 modules it became. `c_proj` names both the attention output
# and the MLP's down projection; which one a tensor is follows from its path.
ADAPTER_MODULES = {
    "c_attn": ("q_proj", "k_proj", "v_proj"),
    "w1": ("up_proj",),
    "w2": ("gate_proj",),
    "c_proj": ("o_proj", "down_proj"),
}
_ADAPTER_PATHS = {
    "attn.c_proj": "self_attn.o_proj",
    "mlp.c_proj": "mlp.down_proj",
    "mlp.w1": "mlp.up_proj",
    "mlp.w2": "mlp.gate_proj",
}


def is_qwen1_adapter(path: str | Path) -> bool:
    """A PEFT adapter whose target modules are Qwen(1)'s (`c_attn`, `w1`, `w2`)."""
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        return False
    targets = json.loads(config.read_text()).get("target_modules") or []
    names = [targets] if isinstance(targets, str) else targets
    return any(qwen1 in name for name in names for qwen1 in ("c_attn", "w1", "w2"))


def servable_adapter(path: str, log=print) -> str:
    """`path`, or for an adapter trained on a Qwen(1) checkpoint its Qwen2 form (made once)."""
    if not is_qwen1_adapter(path):
        return path
    why = "a LoRA adapter of a Qwen(1) checkpoint; converting it once to Qwen2 names"
    return _converted_once(path, "adapter_config.json", convert_adapter, f"[lorafleet] {path} is {why}", log)


def convert_adapter(src: str | Path, out: str | Path) -> Path:
    """The adapter under the converted base's names. `c_attn`'s LoRA becomes q/k/v LoRAs that share
    its A and split its B, which computes the same update: B·A·x split by rows is each B part·A·x."""
    from safetensors.torch import save_file

    from serve_app.exporter import adapter_tensors

    src, out = Path(src), Path(out)
    config = json.loads((src / "adapter_config.json").read_text())
    if config.get("modules_to_save") or config.get("layers_to_transform"):
        raise ConfigError(f"'{src}': modules_to_save / layers_to_transform of a Qwen(1) adapter are not converted.")
    config["target_modules"] = _qwen2_names(config["target_modules"])
    for key in ("rank_pattern", "alpha_pattern"):
        config[key] = {new: v for k, v in (config.get(key) or {}).items() for new in _qwen2_names([k])}
    tensors = {}
    for name, tensor in adapter_tensors(src).items():
        tensors.update(_qwen2_adapter_tensors(name, tensor))
    with complete_or_nothing(out) as partial:
        (partial / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, partial / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def _qwen2_names(targets) -> list[str]:
    if isinstance(targets, str):
        raise ConfigError(f"a regular-expression target_modules ({targets!r}) of a Qwen(1) adapter is not converted.")
    return sorted({new for name in targets for new in ADAPTER_MODULES.get(name, (name,))})


def _qwen2_adapter_tensors(name: str, tensor) -> dict:
    prefix = "base_model.model.transformer.h."
    if not name.startswith(prefix):
        raise ConfigError(f"unexpected tensor '{name}' in a Qwen(1) adapter; not converted.")
    layer, rest = name[len(prefix) :].split(".", 1)
    module, _, lora = rest.partition(".lora_")  # e.g. attn.c_attn, A.weight
    new = f"base_model.model.model.layers.{layer}."
    if module == "attn.c_attn":
        parts = [tensor.clone() for _ in range(3)] if lora.startswith("A") else tensor.chunk(3, dim=0)
        return {
            f"{new}self_attn.{p}.lora_{lora}": t.contiguous() for p, t in zip(("q_proj", "k_proj", "v_proj"), parts)
        }
    if module in _ADAPTER_PATHS and lora:
        return {f"{new}{_ADAPTER_PATHS[module]}.lora_{lora}": tensor}
    raise ConfigError(f"unexpected tensor '{name}' in a Qwen(1) adapter; not converted.")
