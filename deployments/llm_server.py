"""LLMServer deployment: one replica owns one engine (vLLM AsyncLLM or pt) and generates from token ids."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from ray.serve.config import RequestRouterConfig

from deployments.engine_replica.adapter_router import STATS_PERIOD_S, AdapterPlacementRouter
from deployments.engine_replica.coalesce import coalesce
from deployments.engine_replica.reaper import watch_engine_processes
from deployments.engine_replica.residency import AdapterResidency
from lora_registry.adapter_files import inspect_adapter
from lora_registry.remote_sources import AdapterCache
from serve_app.config import ModelConfig
from serve_app.engines import lora_slots, lora_targets
from serve_app.messages import AdapterRef, Delta, FirstMessage, GenerationRequest, ServedBy
from serve_app.platform import freeze_startup_heap, has_nvidia_gpu, set_up_replica_logging

logger = logging.getLogger("ray.serve")  # Serve's logger: lands in the replica's log file

# A client still sees its answer grow every few engine steps, however many streams share a replica.
MAX_TOKENS_PER_MESSAGE = 16


class LLMServer:
    """Streams lists of deltas per request.

    The first delta goes out as soon as the engine produces it. Later deltas wait in a buffer
    until the consumer takes the next message and, while the replica carries many streams, until
    `ceil(streams / streams_per_token_batch)` tokens (at most 16) are there: Serve hands each message off at
    once, so without that every token would be its own Ray message, and messages per second (not
    the engine) would cap tokens per second under load. Nothing waits on a timer.
    """

    async def __init__(self, model: ModelConfig, registry=None, engine_starter=None, adapter_cache: str | None = None):
        set_up_replica_logging()
        # max_loras / max_cpu_loras "auto" become numbers here, where the accelerator is known, and
        # lora_target_modules the registry's decision for this model
        registered, modules = await _registered_adapters(registry, model)
        model = model.model_copy(update={"engine": lora_targets.with_modules(model.engine, modules)})
        self.model, self.slots = lora_slots.for_model(model, registered)
        if model.engine.enable_lora:
            logger.info(
                "%s: %d adapter slots in the engine, %d in host memory (%d registered); LoRA on %s",
                model.served_name,
                self.slots.engine,
                self.slots.host,
                registered,
                list(modules) if modules else "every module",
            )
        starter = engine_starter or start_engine
        self.engine = await starter(self.model)
        # engine processes and socket files must not outlive a killed replica
        self._reaper = watch_engine_processes([d] if (d := getattr(self.engine, "rpc_dir", None)) else [])
        cache = AdapterCache(adapter_cache) if adapter_cache else None
        self.adapters = AdapterResidency(
            self.engine, model.served_name, self.slots.host, registry, _replica_id(), self.slots.engine, cache, modules
        )
        await self.adapters.start()  # adapters marked preload are loaded before the first request
        self.streams = 0  # requests streaming from this replica now
        freeze_startup_heap()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[FirstMessage | list[Delta]]:
        """The first message is a FirstMessage, every later one a list of deltas."""
        started = time.perf_counter()
        async with self.adapters.use(request.adapter) as residency:
            if (local := self.adapters.localized(request.adapter)) is not request.adapter:
                request = dataclasses.replace(request, adapter=local)  # from an object store: this node's copy
            self.streams += 1
            try:
                served = None
                async for deltas in coalesce(self.engine.generate(request), self._tokens_per_message):
                    if served is None:
                        served = ServedBy(self.adapters.replica_id, residency, time.perf_counter() - started)
                        yield FirstMessage(served, deltas)
                    else:
                        yield deltas
            finally:
                self.streams -= 1

    async def warm_adapter(self, adapter: AdapterRef) -> str:
        """A registration's adapter, routed here as its first request will be (residency.warm)."""
        return await self.adapters.warm(adapter)

    def _tokens_per_message(self) -> int:
        per = self.model.streams_per_token_batch
        return min(-(-self.streams // per), MAX_TOKENS_PER_MESSAGE) if per else 1

    def record_routing_stats(self) -> dict:
        """Called by Serve every few seconds; its request router places adapters with it."""
        return self.adapters.routing_stats()

    async def num_running(self) -> int:
        return await self.engine.num_running()

    async def check_health(self) -> None:
        """Called by Serve; an engine fault raises here and Serve replaces the replica."""
        await self.engine.check_health()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.adapters.close()
            self.engine.shutdown()

    @classmethod
    def get_deployment_options(cls, model: ModelConfig) -> dict:
        """Serve options: replicas/autoscaling from config, resources from the TP size.

        vLLM runs the tensor-parallel workers of a replica as its own local processes ("mp"
        executor). On GPUs the replica's actor therefore holds all `tensor_parallel_size` GPUs, so
        Ray hands it (and the workers it spawns) exactly those devices, all on one node. On the CPU
        one placement bundle per worker reserves their cores on one node.
        """
        tp = model.engine.tensor_parallel_size
        opts = model.deployment
        options = dict(
            name=f"LLMServer:{model.served_name}",
            max_ongoing_requests=opts.max_ongoing_requests,
            max_queued_requests=opts.max_queued_requests,
            ray_actor_options={**opts.ray_actor_options},
            health_check_period_s=10,
            graceful_shutdown_timeout_s=opts.drain_s(streams=True),
            health_check_timeout_s=60,
            request_router_config=RequestRouterConfig(
                request_router_class=AdapterPlacementRouter,
                request_router_kwargs={"requests_per_home": model.requests_per_adapter_home},
                request_routing_stats_period_s=STATS_PERIOD_S,
            ),
        )
        if has_nvidia_gpu() and model.infer_backend == "vllm":
            options["ray_actor_options"] = {"num_cpus": opts.num_cpus * tp, "num_gpus": tp} | opts.ray_actor_options
        else:
            bundles = [{"CPU": max(opts.num_cpus, 1)} for _ in range(tp)]
            # The replica's actor runs in the first bundle, so its custom resources go there.
            bundles[0] |= opts.ray_actor_options.get("resources", {})
            options["placement_group_bundles"] = bundles
            options["placement_group_strategy"] = "STRICT_PACK"
        if opts.autoscaling is not None:
            options["autoscaling_config"] = opts.autoscaling.model_dump(exclude={"min_replicas", "max_replicas"}) | {
                "min_replicas": opts.autoscaling.min_replicas,
                "max_replicas": opts.autoscaling.max_replicas,
                "initial_replicas": max(opts.autoscaling.min_replicas, 1),
            }
        else:
            options["num_replicas"] = opts.num_replicas or 1
        return options


async def _registered_adapters(registry, model: ModelConfig) -> tuple[int, tuple[str, ...] | None]:
    """How many adapters are registered for this model now (the startup ones included), and the
    modules its engines apply LoRA to (None: all)."""
    if registry is None:  # tests that build the class directly: the config's adapters decide
        carried = [inspect_adapter(m.path).target_modules for m in model.lora_modules.values()]
        return len(carried), lora_targets.decide(model.engine.lora_target_modules, carried)
    state = await registry.state.remote()
    count = sum(record.base_model == model.served_name for record in state.adapters.values())
    return count, state.engine_modules.get(model.served_name)


def _replica_id() -> str:
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (tests that build the class directly)
        return "local"


async def start_engine(model: ModelConfig):
    """Start the engine a model config asks for."""
    from serve_app.engines.pt_engine import PtEngine, PtSettings
    from serve_app.engines.vllm_engine import VllmEngine
    from serve_app.model_types import resolve_model_dir

    path = resolve_model_dir(model.model_type, model.model_id_or_path)
    e = model.engine
    if model.infer_backend == "pt":
        return await PtEngine.start(
            PtSettings(
                path,
                dtype="bfloat16" if e.dtype == "auto" else e.dtype,
                max_model_len=e.max_model_len,
                trust_remote_code=bool(e.trust_remote_code),
            )
        )
    return await VllmEngine.start(path, e)
