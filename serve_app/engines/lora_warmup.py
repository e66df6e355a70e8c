"""Compile vLLM's LoRA kernels at engine start, not in the first LoRA requests of a fresh machine.

vLLM's Triton LoRA kernels (shrink, expand) are compiled on first use for each kernel config and
each specialisation of their integer arguments that depend on the step's token count M (Triton
compiles an argument equal to 1, divisible by 16 and any other value apart; see _kind). With vLLM's
own configs there are two configs per kernel (M < 128 and M >= 128), and its start (profile run,
CUDA-graph capture with a dummy adapter) compiles some of their variants. lorafleet's tuned configs
(serve_app/assets/lora_kernels) have one config per M bucket, and prefill batches between the
captured sizes and the profile size meet variants nobody compiled: on a fresh H200 a lone LoRA
prefill of 1,501 tokens took 1.76 s, 0.04 s once compiled (bench/lora_warmup_probe.py,
docs/benchmarks.md).

So an engine that uses the tuned configs sends, before it serves, one LoRA request per M that
reaches a bucket (every specialisation of each) with an adapter of zero weights in one module:
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


def token_counts(config_folder: str, gpu_name: str, step_limit: int, capture_sizes: list[int]) -> list[int]:
    """Prompt lengths that, each prefilled alone, meet every kernel variant that a step of at most
    `step_limit` tokens meets: per config table (one per kernel, adapter count and slice count) the
    bucket vLLM picks, and the specialisation (_kind) of the token count the kernels see. A step of at
    most the largest CUDA-graph size runs padded to the next size in `capture_sizes` (empty where
    none are captured). The shortest length of each variant: fewer tokens to prefill at start."""
    tables = _m_key_tables(config_folder, gpu_name)
    if not tables:
        return []
    first_length = {}
    for m in range(1, step_limit + 1):
        seen = padded(m, capture_sizes)
        first_length.setdefault((tuple(_nearest(keys, seen) for keys in tables), _kind(seen)), m)
    return sorted(first_length.values())


def padded(m: int, capture_sizes: list[int]) -> int:
    """The token count a step of m tokens runs with: the next captured CUDA-graph size, or m."""
    return min((c for c in capture_sizes if c >= m), default=m)


def _m_key_tables(config_folder: str, gpu_name: str) -> list[tuple[int, ...]]:
    """The distinct sets of M keys of the shrink and expand configs, one per table
    config[max_loras][num_slices] (each table is then keyed [m][k][n]); vLLM picks the nearest key
    within the table a layer's kernel reads."""
    tables = set()
    for kernel in ("SHRINK", "EXPAND_TRUE", "EXPAND_FALSE"):
        path = os.path.join(config_folder, f"{gpu_name}_{kernel}.json")
        if os.path.exists(path):
            with open(path) as f:
                config = json.load(f)
            tables |= {
                tuple(sorted(int(m) for m in by_m)) for by_slices in config.values() for by_m in by_slices.values()
            }
    return sorted(tables)


def _nearest(keys: tuple[int, ...], m: int) -> int:
    """The key vLLM's lookup picks for M: an exact key, else the nearest (the first of a tie)."""
    return m if m in keys else min(keys, key=lambda k: abs(k - m))


def _kind(m: int) -> int:
    """What Triton's specialisation of the kernels' integer arguments sees of M. M itself is
    specialised as 1, divisible by 16 or neither, and so are the strides M * rank of the
    intermediate buffer ([slices, M, rank]), whose divisibility by 16 depends on M's factors of 2.
    So: -1 for M = 1, else M's factors of 2 (0 to 4; 4 standing for 16 and more)."""
    return -1 if m == 1 else min((m & -m).bit_length() - 1, 4)


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
    cached prefix (which would shrink its step below `length` tokens). Ids 50-949 exist in every
    vocabulary lorafleet serves (tiny-chat's has 1,024)."""
    return [(index * 131 + j * 17) % 900 + 50 for j in range(length)]
