"""The deployment graph. `serve_config.yaml` points at `build_app`; `lorafleet deploy` calls it too.

Ingress ──▶ Renderer            (prompt token ids)
   └──────▶ LLMServer:<model>   (one deployment per base model, one engine per replica)
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from deployments.ingress import Ingress
from deployments.ingress import app as fastapi_app
from deployments.llm_server import LLMServer
from deployments.renderer import Renderer
from serve_app.config import AppConfig, DeploymentOptions


def build_app(args: dict[str, Any]) -> Application:
    """Validate `args` into an AppConfig and bind the graph."""
    return build_from_config(AppConfig.model_validate(args))


def build_from_config(config: AppConfig) -> Application:
    servers = {
        m.served_name: serve.deployment(LLMServer).options(**LLMServer.get_deployment_options(m)).bind(m)
        for m in config.models
    }
    renderer = (
        serve.deployment(Renderer).options(**serve_options("Renderer", config.renderer.deployment)).bind(config.models)
    )
    ingress = serve.deployment(serve.ingress(fastapi_app)(Ingress))
    return ingress.options(**serve_options("Ingress", config.ingress.deployment)).bind(config, renderer, servers)


def serve_options(name: str, opts: DeploymentOptions) -> dict:
    """Serve options of a CPU-only deployment."""
    options = dict(
        name=name,
        max_ongoing_requests=opts.max_ongoing_requests,
        max_queued_requests=opts.max_queued_requests,
        ray_actor_options={"num_cpus": opts.num_cpus, **opts.ray_actor_options},
    )
    if opts.autoscaling is not None:
        options["autoscaling_config"] = opts.autoscaling.model_dump()
    else:
        options["num_replicas"] = opts.num_replicas or 1
    return options
