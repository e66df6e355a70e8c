"""Compile vLLM's LoRA kernels at engine start, not in the first LoRA requests of a fresh machine.

vLLM's Triton LoRA kernels (shrink, expand) are compiled on first use for each kernel config and
each specialisation of the token count M (Triton compiles M == 1, M divisible by 16 and any other M
apart). With vLLM's own configs there are two per kernel (M < 128 and M >= 128), and its start
(profile run, CUDA-graph capture with a dummy adapter) compiles them. lorafleet's tuned configs
(serve_app/assets/lora_kernels) have one config per M bucket, and prefill batches between the
captured sizes and the profile size meet buckets nobody compiled: on a fresh H200 the first LoRA
run's TTFT p99 was 2.3 s against 0.9-1.1 s in every later run (docs/benchmarks.md).

So an engine that uses the tuned configs sends, before it serves, one LoRA request per M that
reaches a bucket (both specialisations of each) with an adapter of zero weights in one module:
every LoRA layer runs its kernels for an adapter in the batch whether or not that adapter has
weights there.
"""

from __future__ import annotations

import json
import os
import tempfile

from serve_app.engines.lora_targets import unpacked

# An adapter id no registration reaches (registry ids count up from 1).
WARMUP_ADAPTER_ID = 2**31 - 1


def token_counts(config_folder: str, gpu_name: str, max_prompt_len: int) -> list[int]:
    """Prompt lengths that, each prefilled alone, reach every M bucket of the tuned configs of this
    GPU model: per bucket k one M divisible by 16 (or 1) and one not, each nearer k than any other
    bucket; none longer than `max_prompt_len`."""
    buckets = sorted(_m_buckets(config_folder, gpu_name))
    counts = []
    for k in buckets:
        kinds = set()
        for m in (k, k - 1, k + 1):  # k - 1 first: the largest bucket is often the step limit
            if 1 <= m <= max_prompt_len and _nearest(buckets, m) == k and _kind(m) not in kinds:
                counts.append(m)
                kinds.add(_kind(m))
    return sorted(counts)


def _m_buckets(config_folder: str, gpu_name: str) -> set[int]:
    """Every M key of the shrink and expand configs: config[max_loras][num_slices][m][k][n]."""
    buckets = set()
    for kind in ("SHRINK", "EXPAND_TRUE", "EXPAND_FALSE"):
        path = os.path.join(config_folder, f"{gpu_name}_{kind}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            config = json.load(f)
        buckets |= {int(m) for by_slices in config.values() for by_m in by_slices.values() for m in by_m}
    return buckets


def _nearest(buckets: list[int], m: int) -> int:
    """The bucket vLLM picks for M: an exact key, else the nearest (the first of a tie)."""
    return m if m in buckets else min(buckets, key=lambda k: abs(k - m))


def _kind(m: int) -> str:
    """Triton's specialisation of an integer argument."""
    return "one" if m == 1 else "div16" if m % 16 == 0 else "other"


def weightless_adapter(model_config: dict, targets: list[str] | str, rank: int) -> str | None:
    """A folder holding a peft adapter whose one module (in layer 0, one the engine applies LoRA
    to) has zero weights: its requests run every LoRA kernel and generate what the base model does.
    vLLM refuses an adapter with no module at all. None for a checkpoint whose layout this does not
    know. The caller removes the folder."""
    import torch
    from safetensors.torch import save_file

    shapes = _module_shapes(model_config.get("text_config") or model_config)
    allowed = set(shapes) if targets == "all" else unpacked(targets)
    module = next((m for m in shapes if m in allowed), None)
    if module is None:
        return None
    width_in, width_out = shapes[module]
    block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    prefix = f"base_model.model.model.layers.0.{block}.{module}"
    folder = tempfile.mkdtemp(prefix="lorafleet-warmup-")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": [module], "bias": "none"}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    weights = {
        f"{prefix}.lora_A.weight": torch.zeros(rank, width_in, dtype=torch.bfloat16),
        f"{prefix}.lora_B.weight": torch.zeros(width_out, rank, dtype=torch.bfloat16),
    }
    save_file(weights, os.path.join(folder, "adapter_model.safetensors"))
    return folder


def _module_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) width of each LoRA module of a Llama-layout decoder layer, from its config.json."""
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if not hidden or not heads:
        return {}
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (heads * head_dim, hidden),
    }
    if inner := config.get("intermediate_size"):
        shapes |= {"gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}
    return shapes


def warmup_prompt(index: int, length: int) -> list[int]:
    """Token ids of a warm-up prompt: the first differs between prompts, so none reuses another's
    cached prefix (which would shrink its step below `length` tokens). Ids below 900 exist in every
    vocabulary lorafleet serves."""
    return [(index * 131 + j * 17) % 900 + 50 for j in range(length)]
