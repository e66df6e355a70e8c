"""The deployment graph. `serve_config.yaml` points at `build_app`; `lorafleet deploy` calls it too.

Ingress ──▶ Renderer            (prompt token ids)
   ├──────▶ LLMServer:<model>   (one deployment per base model, one engine per replica)
   └──────▶ LoraRegistry        (adapter records; Ingress and LLMServer follow it by long-poll)
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from deployments.ingress import Ingress
from deployments.ingress import app as fastapi_app
from deployments.llm_server import LLMServer
from deployments.renderer import Renderer
from lora_registry.registry import BaseModelSpec, LoraRegistry, StartupAdapter
from serve_app.config import AppConfig, ModelConfig
from serve_app.engines.lora_targets import VLLM_LORA_MODULES
from serve_app.model_types import context_length, resolve_model_dir


def build_app(args: dict[str, Any]) -> Application:
    """Validate `args` into an AppConfig and bind the graph."""
    return build_from_config(AppConfig.model_validate(args))


def build_from_config(config: AppConfig) -> Application:
    config = config.model_copy(update={"models": [with_context_length(m) for m in config.models]})
    registry = build_registry(config)
    servers = {
        m.served_name: serve.deployment(LLMServer)
        .options(**LLMServer.get_deployment_options(m))
        .bind(m, registry, adapter_cache=config.registry.adapter_cache)
        for m in config.models
    }
    renderer = serve.deployment(Renderer).options(**Renderer.get_deployment_options(config))
    ingress = serve.deployment(serve.ingress(fastapi_app)(Ingress))
    ingress = ingress.options(**Ingress.get_deployment_options(config))
    return ingress.bind(config, renderer.bind(config.models), servers, registry)


def with_context_length(model: ModelConfig) -> ModelConfig:
    """The model with its context length decided, so the engine is started with the same number
    that the renderer checks prompts against and the model cards show."""
    path = resolve_model_dir(model.model_type, model.model_id_or_path)
    length = context_length(path, model.engine.max_model_len, bool(model.engine.trust_remote_code))
    return model.model_copy(update={"engine": model.engine.model_copy(update={"max_model_len": length})})


def build_registry(config: AppConfig) -> Application:
    """The registry deployment, bound to the base models it checks adapters against."""
    bases = [base_model_spec(m) for m in config.models]
    startup = {
        name: StartupAdapter(m.served_name, module.path, module.pinned, module.preload)
        for m in config.models
        for name, module in m.lora_modules.items()
    }
    reg = config.registry
    registry = serve.deployment(LoraRegistry).options(**LoraRegistry.get_deployment_options(reg.ray_actor_options))
    return registry.bind(reg.state_dir, bases, reg.allowed_roots, startup, reg.database_url)


def base_model_spec(model: ModelConfig) -> BaseModelSpec:
    """What the registry checks this model's adapters against."""
    from transformers import AutoConfig

    path = resolve_model_dir(model.model_type, model.model_id_or_path)
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=model.engine.trust_remote_code).to_dict()
    except (OSError, ValueError):
        hf_config = {}  # not readable here (e.g. a hub id offline): rank and modules are still checked
    if model.infer_backend == "pt":  # peft applies any LoRA it can load
        return BaseModelSpec(model.served_name, hf_config, True, 1 << 16, None)
    engine = model.engine
    return BaseModelSpec(
        model.served_name,
        hf_config,
        engine.enable_lora,
        engine.max_lora_rank,
        VLLM_LORA_MODULES,
        engine.lora_target_modules,
    )
