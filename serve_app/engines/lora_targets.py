"""`lora_target_modules: auto`: an engine applies LoRA only where the adapters it serves have it.

vLLM wraps every linear layer it supports in a LoRA layer and, for every batch with a LoRA request,
runs the LoRA kernels on all of them, also where the adapters carry no weights (those slots hold
zeros). On an H200 (Qwen2.5-7B shape, batch 64, rank-8 adapters on q_proj/v_proj) a decode step
with 64 distinct adapters took 37.3 ms with LoRA on every module and 12.3 ms with LoRA on q/v only
(base: 5.0 ms; `bench/lora_step_profile.py`, docs/benchmarks.md). lorafleet knows every adapter it
serves, so:
- `auto` (the default): the union of the modules of the adapters registered for the model when
  the registry starts (the config's and those registered before a restart); every module when
  there are none, so an app started without adapters takes any adapter later;
- `all`: every module vLLM supports (vLLM's own default);
- a list: these modules.
The registry decides once per base model and refuses a later adapter that needs a module outside
the set (vLLM would silently drop those weights), naming the fix.
"""

from __future__ import annotations

from collections.abc import Iterable

# vLLM's packed layers and the adapter modules (peft names) they carry
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
ADAPTER_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
VLLM_LORA_MODULES = ADAPTER_MODULES | frozenset(PACKED)


def unpacked(modules: Iterable[str]) -> frozenset[str]:
    """Adapter module names, a packed vLLM name standing for its parts."""
    return frozenset(part for m in modules for part in PACKED.get(m, (m,)))


def decide(setting: str | list[str], adapters: Iterable[Iterable[str]]) -> tuple[str, ...] | None:
    """The modules an engine applies LoRA to (None: all), from the setting and the target modules
    of the adapters registered for its model."""
    if setting == "all":
        return None
    if setting == "auto":
        union = frozenset().union(*(unpacked(a) for a in adapters))
        return tuple(sorted(union)) or None
    return tuple(sorted(unpacked(setting)))


def missing(adapter: Iterable[str], engine: tuple[str, ...] | None) -> list[str]:
    """Modules of `adapter` the engine carries no LoRA on (none when it carries all)."""
    return [] if engine is None else sorted(unpacked(adapter) - set(engine))


def refusal(name: str, base: str, bad: list[str], engine: tuple[str, ...], setting) -> str:
    why = "from the adapters registered at start" if setting == "auto" else "as configured"
    return (
        f"adapter '{name}' has LoRA weights on {bad}, but the engines of '{base}' apply LoRA only to "
        f"{list(engine)} (lora_target_modules: {setting}, {why}; fewer modules make LoRA steps faster). "
        f"Redeploy with lora_target_modules all, or with these modules listed too (serve_config.yaml: the "
        f"model's engine.lora_target_modules; lorafleet deploy: --lora_target_modules all)."
    )


def with_modules(options, modules: tuple[str, ...] | None):
    """`options` (EngineOptions) with `lora_target_modules` decided: the list, or "all"."""
    return options.model_copy(update={"lora_target_modules": list(modules) if modules else "all"})
