"""A Qwen(1)-layout checkpoint (`QWenLMHeadModel`, `qwen.tiktoken`) made from tiny-chat's weights by
the inverse of serve_app/qwen1_convert.py's mapping, as Qwen/Qwen-7B-Chat's files are laid out."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from serve_app.model_types import TINY_CHAT_DIR, XIAO_HUANG_DIR
from serve_app.qwen1_convert import byte_chars

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def qwen1_ids() -> tuple[dict[bytes, int], dict[int, int]]:
    """tiny-chat's vocabulary as tiktoken ranks, and tiny-chat id -> Qwen(1) id. tiny-chat's ids are
    its 3 special tokens, then the 256 bytes, then its merges in order; Qwen(1) puts the ranked
    vocabulary first and the special tokens after it."""
    tokenizer = json.loads((TINY_CHAT_DIR / "tokenizer.json").read_text())
    char_byte = {c: b for b, c in byte_chars().items()}
    by_id = sorted((i, t) for t, i in tokenizer["model"]["vocab"].items() if t not in SPECIALS)
    ranks = {bytes(char_byte[c] for c in token): rank for rank, (_, token) in enumerate(by_id)}
    new_id = {old: rank for rank, (old, _) in enumerate(by_id)}
    specials = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    new_id.update({specials[t]: len(ranks) + i for i, t in enumerate(SPECIALS)})
    return ranks, new_id


def write_qwen1_checkpoint(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((TINY_CHAT_DIR / "config.json").read_text())
    ranks, new_id = qwen1_ids()
    (out / "qwen.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    tiny = load_file(TINY_CHAT_DIR / "model.safetensors")
    wte = torch.zeros_like(tiny["model.embed_tokens.weight"])
    for old, new in new_id.items():
        wte[new] = tiny["model.embed_tokens.weight"][old]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    tensors = {
        "transformer.wte.weight": wte,
        "lm_head.weight": wte.clone(),
        "transformer.ln_f.weight": tiny["model.norm.weight"],
    }

    def per_query_head(t: torch.Tensor) -> torch.Tensor:
        """Qwen(1) has no grouped-query attention: each query head gets its own copy of its K/V head."""
        return t.reshape(kv_heads, head_dim, *t.shape[1:]).repeat_interleave(heads // kv_heads, 0).flatten(0, 1)

    for layer in range(config["num_hidden_layers"]):
        old, new = f"model.layers.{layer}.", f"transformer.h.{layer}."
        for kind in ("weight", "bias"):
            q, k, v = (tiny[old + f"self_attn.{p}_proj.{kind}"] for p in "qkv")
            tensors[new + f"attn.c_attn.{kind}"] = torch.cat([q, per_query_head(k), per_query_head(v)])
        tensors[new + "attn.c_proj.weight"] = tiny[old + "self_attn.o_proj.weight"]
        tensors[new + "ln_1.weight"] = tiny[old + "input_layernorm.weight"]
        tensors[new + "ln_2.weight"] = tiny[old + "post_attention_layernorm.weight"]
        tensors[new + "mlp.w1.weight"] = tiny[old + "mlp.up_proj.weight"]
        tensors[new + "mlp.w2.weight"] = tiny[old + "mlp.gate_proj.weight"]
        tensors[new + "mlp.c_proj.weight"] = tiny[old + "mlp.down_proj.weight"]
    save_file(tensors, out / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    qwen1 = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "model_type": "qwen",
        "hidden_size": config["hidden_size"],
        "intermediate_size": 2 * config["intermediate_size"],
        "kv_channels": head_dim,
        "layer_norm_epsilon": config["rms_norm_eps"],
        "max_position_embeddings": config["max_position_embeddings"],
        "seq_length": config["max_position_embeddings"],
        "no_bias": True,
        "num_attention_heads": heads,
        "num_hidden_layers": config["num_hidden_layers"],
        "rotary_emb_base": config["rope_parameters"]["rope_theta"],
        "rotary_pct": 1.0,
        "tie_word_embeddings": False,
        "tokenizer_class": "QWenTokenizer",
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "vocab_size": config["vocab_size"],
        "bf16": True,
    }
    (out / "config.json").write_text(json.dumps(qwen1, indent=2))
    tokenizer_config = {
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
        "model_max_length": 8192,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    generation = {
        "chat_format": "chatml",
        "eos_token_id": len(ranks),
        "pad_token_id": len(ranks),
        "max_new_tokens": 512,
        "do_sample": False,
        "stop_words_ids": [[len(ranks)]],
    }
    (out / "generation_config.json").write_text(json.dumps(generation))
    return out


def write_qwen1_adapter(out: Path) -> Path:
    """xiao-huang as an adapter of the Qwen(1) checkpoint above, exactly: one `c_attn` LoRA whose A
    stacks q's, k's and v's A and whose B is block-diagonal (k's and v's rows repeated per query head
    as the base's are), rank 3r; the MLP and output LoRAs padded with zeros to the same rank, the
    alpha scaled so that alpha / r stays xiao-huang's."""
    config = json.loads((TINY_CHAT_DIR / "config.json").read_text())
    adapter = json.loads((XIAO_HUANG_DIR / "adapter_config.json").read_text())
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    lora = load_file(XIAO_HUANG_DIR / "adapter_model.safetensors")
    r = adapter["r"]
    rank = 3 * r

    def repeated(b: torch.Tensor) -> torch.Tensor:
        return b.reshape(kv_heads, head_dim, r).repeat_interleave(heads // kv_heads, 0).flatten(0, 1)

    def padded(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([a, torch.zeros(rank - r, a.shape[1], dtype=a.dtype)]), torch.cat(
            [b, torch.zeros(b.shape[0], rank - r, dtype=b.dtype)], dim=1
        )

    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        old, new = f"base_model.model.model.layers.{layer}.", f"base_model.model.transformer.h.{layer}."
        a = {p: lora[f"{old}self_attn.{p}_proj.lora_A.weight"] for p in "qkv"}
        b = {p: lora[f"{old}self_attn.{p}_proj.lora_B.weight"] for p in "qkv"}
        b["k"], b["v"] = repeated(b["k"]), repeated(b["v"])
        stacked_b = torch.zeros(sum(x.shape[0] for x in b.values()), rank, dtype=b["q"].dtype)
        row = 0
        for i, p in enumerate("qkv"):
            stacked_b[row : row + b[p].shape[0], i * r : (i + 1) * r] = b[p]
            row += b[p].shape[0]
        tensors[f"{new}attn.c_attn.lora_A.weight"] = torch.cat([a["q"], a["k"], a["v"]])
        tensors[f"{new}attn.c_attn.lora_B.weight"] = stacked_b
        for qwen2, qwen1 in (
            ("self_attn.o_proj", "attn.c_proj"),
            ("mlp.up_proj", "mlp.w1"),
            ("mlp.gate_proj", "mlp.w2"),
            ("mlp.down_proj", "mlp.c_proj"),
        ):
            a_pad, b_pad = padded(lora[f"{old}{qwen2}.lora_A.weight"], lora[f"{old}{qwen2}.lora_B.weight"])
            tensors[f"{new}{qwen1}.lora_A.weight"], tensors[f"{new}{qwen1}.lora_B.weight"] = a_pad, b_pad
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    adapter |= {"r": rank, "lora_alpha": adapter["lora_alpha"] * 3, "target_modules": ["c_attn", "c_proj", "w1", "w2"]}
    adapter["base_model_name_or_path"] = "/root/.cache/modelscope/hub/qwen/Qwen-7B-Chat"
    (out / "adapter_config.json").write_text(json.dumps(adapter, indent=2))
    return out
