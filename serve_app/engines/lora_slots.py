"""`max_loras: auto` and `max_cpu_loras: auto`: how many adapters an engine holds, decided here.

vLLM sizes nothing for the user (its default is one adapter slot), and with fewer slots than the
adapters in use requests queue for a slot: on an H200, 32 adapters over 8 slots gave TTFT p50 3.3 s
(issue 22). Slots cost accelerator memory: each holds the A and B matrices of every LoRA-carrying
module at the largest rank allowed. So:
- engine slots (`max_loras`): one per adapter registered for the model when the engine starts, at
  least MIN_SLOTS, at most MAX_SLOTS and at most what LORA_MEMORY_SHARE of the accelerator memory
  that vLLM may use holds;
- host slots (`max_cpu_loras`): adapters kept loaded in host memory, so that bringing one back into
  an engine slot is a copy, not a disk read: HOST_MEMORY_SHARE of the host memory available, at
  most MAX_HOST_SLOTS, never fewer than the engine slots.
Explicit numbers in the config win. The result is logged and reported with the replica's residency
(`GET /v1/adapters`, `/metrics`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)  # (in a replica, deployments/llm_server.py logs the numbers)

MIN_SLOTS, MAX_SLOTS = 4, 64
MAX_HOST_SLOTS = 1024
LORA_MEMORY_SHARE = 0.05  # of the accelerator memory vLLM may use; the rest is weights and KV cache
HOST_MEMORY_SHARE = 0.10
# (in, out) sizes of the modules vLLM applies LoRA to, from a Hugging Face config
_MODULES = {
    "q_proj": lambda c: (c.hidden, c.heads * c.head_dim),
    "k_proj": lambda c: (c.hidden, c.kv_heads * c.head_dim),
    "v_proj": lambda c: (c.hidden, c.kv_heads * c.head_dim),
    "o_proj": lambda c: (c.heads * c.head_dim, c.hidden),
    "gate_proj": lambda c: (c.hidden, c.intermediate),
    "up_proj": lambda c: (c.hidden, c.intermediate),
    "down_proj": lambda c: (c.intermediate, c.hidden),
}


@dataclass(frozen=True)
class LoraSlots:
    """What one engine holds: `engine` adapters at once in a batch, `host` loaded in all."""

    engine: int
    host: int
    slot_bytes: int  # accelerator memory of one engine slot at the largest rank


@dataclass(frozen=True)
class _Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int


def slot_bytes(hf_config: dict, max_rank: int, dtype_bytes: int = 2) -> int:
    """Memory of one adapter slot: A (in x rank) and B (rank x out) of every LoRA module, every layer."""
    config = hf_config.get("text_config") or hf_config
    heads = config["num_attention_heads"]
    shape = _Shape(
        hidden=config["hidden_size"],
        intermediate=config.get("intermediate_size") or 4 * config["hidden_size"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        layers=config["num_hidden_layers"],
    )
    per_layer = sum(sum(size(shape)) for size in _MODULES.values())
    return max_rank * per_layer * shape.layers * dtype_bytes


def decide(
    engine: int | str,
    host: int | str | None,
    registered: int,
    one_slot_bytes: int,
    accelerator_bytes: int | None,
    host_bytes: int,
) -> LoraSlots:
    """The numbers for `max_loras` / `max_cpu_loras` given as numbers or "auto"."""
    if engine == "auto":
        fits = int(accelerator_bytes * LORA_MEMORY_SHARE // one_slot_bytes) if accelerator_bytes else MAX_SLOTS
        engine = max(1, min(max(registered, MIN_SLOTS), MAX_SLOTS, fits))
        if isinstance(host, int):  # vLLM needs max_cpu_loras >= max_loras
            engine = min(engine, host)
    if host == "auto":
        fits = int(host_bytes * HOST_MEMORY_SHARE // one_slot_bytes)
        host = max(engine, min(fits, MAX_HOST_SLOTS))
    return LoraSlots(int(engine), int(host or engine), one_slot_bytes)


def accelerator_bytes(tensor_parallel_size: int, gpu_memory_utilization: float) -> int | None:
    """The accelerator memory vLLM may use for one replica: its GPUs' share, or on the CPU the KV
    cache space vLLM is given (VLLM_CPU_KVCACHE_SPACE GiB)."""
    from serve_app.platform import has_nvidia_gpu, query_gpus

    if has_nvidia_gpu():
        total = min((int(mib) * 2**20 for mib in query_gpus("memory.total")), default=0)
        return int(total * gpu_memory_utilization * tensor_parallel_size) or None  # None: not known
    return int(float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 4) * 2**30)


def host_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


def resolve(options, model_dir: str, registered: int, hf_config: dict):
    """`options` (EngineOptions) with both adapter counts as numbers, and the LoraSlots chosen."""
    try:
        one = slot_bytes(hf_config, options.max_lora_rank, 4 if options.dtype == "float32" else 2)
    except (KeyError, TypeError):  # a config of another shape: the memory bound is left out
        one = 1
    slots = decide(
        options.max_loras,
        options.max_cpu_loras,
        registered,
        one,
        accelerator_bytes(options.tensor_parallel_size, options.gpu_memory_utilization),
        host_bytes(),
    )
    if "auto" in (options.max_loras, options.max_cpu_loras):
        logger.info(
            "adapter slots for %s: %d in the engine, %d in host memory (%d registered; %.1f MiB per slot)",
            model_dir,
            slots.engine,
            slots.host,
            registered,
            one / 2**20,
        )
    return options.model_copy(update={"max_loras": slots.engine, "max_cpu_loras": slots.host}), slots


def for_model(model, registered: int):
    """`model` (a ModelConfig) with its adapter counts decided, and the LoraSlots chosen."""
    from serve_app.model_types import resolve_model_dir

    path = resolve_model_dir(model.model_type, model.model_id_or_path)
    engine, slots = resolve(model.engine, path, registered, hf_config(path, bool(model.engine.trust_remote_code)))
    return model.model_copy(update={"engine": engine}), slots


def hf_config(path: str, trust_remote_code: bool) -> dict:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).to_dict()
    except (OSError, ValueError):
        return {}  # not readable here: the memory bound is left out
