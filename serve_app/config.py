"""The one config tree: `serve_config.yaml` args and `lorafleet deploy` flags both build `AppConfig`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.engines.lora_targets import VLLM_LORA_MODULES
from serve_app.model_types import MODELS, check_remote_code, get_model_info, trusts_remote_code
from serve_app.qwen1_convert import servable_adapter

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def resolve_path(path: str) -> str:
    """Absolute path for replicas: relative paths are taken from the working directory, else from
    the project root (`serve deploy` builds the app in a cluster process elsewhere). URLs
    (s3://..., adapters in object stores) stay as they are."""
    if "://" in path:
        return path
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return str(candidate)
    for base in (Path.cwd(), PROJECT_ROOT):
        if (base / candidate).exists():
            return str((base / candidate).resolve())
    return str(candidate.resolve())


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class AutoscalingOptions(Strict):
    """Ray Serve autoscaling. Scale-up happens when ongoing requests per replica exceed the target."""

    min_replicas: int = Field(1, ge=0, description="replicas kept when idle")
    max_replicas: int = Field(
        1, ge=1, description="upper bound; each LLMServer replica takes tensor_parallel_size devices"
    )
    target_ongoing_requests: float = Field(
        16,
        gt=0,
        description="in-flight requests per replica that autoscaling aims for (about the batch size that saturates one replica)",
    )
    upscale_delay_s: float = Field(
        10.0, ge=0, description="load must stay above target this long before adding a replica"
    )
    downscale_delay_s: float = Field(
        60.0, ge=0, description="load must stay below target this long before removing one"
    )
    metrics_interval_s: float = Field(2.0, gt=0, description="how often replicas report load")
    look_back_period_s: float = Field(10.0, gt=0, description="window over which load is averaged")

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        return self


# A replica that stops while streaming (a redeploy, a downscale) lets its streams finish for this long:
# a long generation on a busy GPU takes minutes (Serve's own default, 20 s, would cut it).
STREAM_DRAIN_S = 600.0


class DeploymentOptions(Strict):
    """Serve options of one deployment. Give `num_replicas` for a fixed size or `autoscaling`."""

    num_replicas: int | None = Field(None, ge=1, description="fixed replica count; excludes autoscaling")
    autoscaling: AutoscalingOptions | None = Field(None, description="autoscaling bounds and target")
    max_ongoing_requests: int = Field(64, ge=1, description="requests one replica runs at once; more wait in the queue")
    max_queued_requests: int = Field(
        256, ge=-1, description="requests waiting for a replica before new ones get 503 (-1: unbounded)"
    )
    num_cpus: float = Field(
        1.0, ge=0, description="CPUs reserved per replica (for LLMServer: per tensor-parallel worker)"
    )
    ray_actor_options: dict[str, Any] = Field(default_factory=dict, description="extra Ray actor options")
    graceful_shutdown_timeout_s: float | None = Field(
        None,
        ge=0,
        description="how long a stopping replica (a redeploy, a downscale, the app deleted) waits for its requests "
        f"to finish before they are cut (default: {STREAM_DRAIN_S:.0f} s for the ingress and engine replicas, "
        "which carry streams; Serve's 20 s for the renderer)",
    )

    @model_validator(mode="after")
    def _one_scaling_mode(self):
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("give either num_replicas or autoscaling, not both")
        return self

    def drain_s(self, streams: bool) -> float | None:
        """graceful_shutdown_timeout_s, or its default: STREAM_DRAIN_S where requests are streams."""
        if self.graceful_shutdown_timeout_s is not None:
            return self.graceful_shutdown_timeout_s
        return STREAM_DRAIN_S if streams else None

    @property
    def most_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling is not None else self.num_replicas or 1

    def may_scale_to_zero(self) -> bool:
        return self.autoscaling is not None and self.autoscaling.min_replicas == 0

    def serve_options(self, name: str, streams: bool = False) -> dict:
        """Ray Serve options of a CPU-only deployment (Ingress, Renderer) with these settings;
        `streams`: its requests may be long streams, which a stopping replica lets finish."""
        options = dict(
            name=name,
            max_ongoing_requests=self.max_ongoing_requests,
            max_queued_requests=self.max_queued_requests,
            ray_actor_options={"num_cpus": self.num_cpus, **self.ray_actor_options},
        )
        if (drain := self.drain_s(streams)) is not None:
            options["graceful_shutdown_timeout_s"] = drain
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options


class EngineOptions(Strict):
    """The engine settings, declared once: `serve_config.yaml`'s `engine:`, the CLI's model flags and
    `get_vllm_engine`'s keywords are all built from these fields, and each field is passed to vLLM's
    `AsyncEngineArgs` under its own name (anything else goes in `engine_kwargs`)."""

    tensor_parallel_size: int = Field(1, ge=1, description="devices per replica; placement bundles derive from it")
    dtype: str = Field("auto", description="auto, bfloat16, float16 or float32")
    max_model_len: int | None = Field(
        None, ge=16, description="context length (default: the checkpoint's max_position_embeddings)"
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of each GPU vLLM may use")
    enforce_eager: bool = Field(False, description="skip CUDA graphs / compilation (faster start, slower decode)")
    enable_lora: bool = Field(False, description="serve LoRA adapters (on automatically when adapters are given)")
    max_loras: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="adapters one engine batch can mix (vLLM max_loras); auto: one per adapter registered at "
        "start, at least 4, at most 64 and what 5% of the accelerator memory holds",
    )
    max_cpu_loras: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        "auto",
        description="adapters a replica keeps loaded (LRU, evicted ones are removed from the engine); auto: what "
        "10% of the free host memory holds (at most 1024); none: max_loras",
    )
    max_lora_rank: int = Field(16, ge=1, description="largest adapter rank the engine accepts")
    lora_target_modules: list[str] | Literal["auto", "all"] = Field(
        "auto",
        description="modules the engine applies LoRA to (vLLM lora_target_modules); auto: those the adapters "
        "registered at start carry (every module when there are none), all: every module vLLM supports, or a list "
        "such as [q_proj, v_proj] (q_proj,v_proj as a flag); an adapter needing another module is refused",
    )
    max_num_seqs: int | None = Field(None, ge=1, description="sequences per engine step (batch size)")
    seed: int = Field(0, description="engine seed")
    trust_remote_code: bool | None = Field(
        None,
        description="run the checkpoint's own Python code (its auto_map); default: on for model types that "
        "need it (qwen-7b-chat, qwen-7b, chatglm3-6b), off for other models",
    )
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="other vLLM AsyncEngineArgs fields")

    def vllm_kwargs(self) -> dict[str, Any]:
        """These settings as `AsyncEngineArgs` keywords: unset ones are left to vLLM, the LoRA ones
        only when LoRA is on, `engine_kwargs` last (it may override any of them)."""
        lora_only = {"max_loras", "max_cpu_loras", "max_lora_rank", "lora_target_modules"}
        if self.enable_lora and "auto" in (self.max_loras, self.max_cpu_loras, self.lora_target_modules):
            raise ValueError("max_loras / max_cpu_loras / lora_target_modules 'auto' must be resolved first")
        kwargs = {
            name: value
            for name, value in self.model_dump(exclude={"engine_kwargs"}).items()
            if value is not None and (self.enable_lora or name not in lora_only)
        }
        if kwargs.get("lora_target_modules") == "all":
            del kwargs["lora_target_modules"]  # vLLM's default: every module it supports
        return {**kwargs, **self.engine_kwargs}

    @field_validator("lora_target_modules")
    @classmethod
    def _known_modules(cls, value):
        if isinstance(value, list) and (not value or set(value) - VLLM_LORA_MODULES):
            raise ValueError(
                f"lora_target_modules {value} is not auto, all or a non-empty list of {sorted(VLLM_LORA_MODULES)}"
            )
        return value


VLLM_ENGINE_FIELDS = tuple(name for name in EngineOptions.model_fields if name != "engine_kwargs")


class LoraModule(Strict):
    """An adapter served from the start. In `lora_modules` a bare path means these defaults."""

    path: str = Field(description="the PEFT adapter folder")
    pinned: bool = Field(False, description="never evicted from an engine replica once loaded")
    preload: bool = Field(True, description="loaded on every engine replica before it takes requests")


class ModelConfig(Strict):
    """One served base model: one LLMServer deployment."""

    name: str | None = Field(None, description="the `model` clients send (default: the model type)")
    model_type: str | None = Field(None, description="a model type from the table, e.g. tiny-chat or qwen-7b-chat")
    model_id_or_path: str | None = Field(None, description="local checkpoint dir or hub id (overrides the type's)")
    template_type: str | None = Field(
        None,
        description="a named (ms-swift) template; default: the checkpoint's own chat template when its tokenizer "
        "has one, else the model type's",
    )
    default_system: str | None = Field(
        None, description="the system prompt of chats that send none (ms-swift's --system); default: the template's"
    )
    tool_call_format: Literal["hermes", "llama3_json"] | None = Field(
        None, description="how the model writes tool calls (hermes: Qwen2/2.5; llama3_json); default: the model type's"
    )
    infer_backend: Literal["vllm", "pt"] = Field("vllm", description="vllm, or pt (transformers + peft)")
    engine: EngineOptions = Field(default_factory=EngineOptions)
    lora_modules: dict[str, LoraModule] = Field(
        default_factory=dict,
        description="adapters served from the start: name -> path, or name -> {path, pinned, preload}",
    )
    deployment: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(autoscaling=AutoscalingOptions()))
    requests_per_adapter_home: int = Field(
        16,
        ge=1,
        description="with several replicas: an adapter gets one more home replica for every this many of its "
        "requests in flight (a hot adapter spreads; a quiet one is loaded on one replica)",
    )
    streams_per_token_batch: int = Field(
        4,
        ge=0,
        description="under load, each engine message carries up to ceil(streams on the replica / this) tokens (max 16) "
        "(fewer Ray messages; the first token is never held); 0: one message per engine output",
    )

    @model_validator(mode="after")
    def _check(self):
        if not self.model_type and not self.model_id_or_path:
            raise ValueError("each model needs model_type or model_id_or_path")
        if self.model_type:
            get_model_info(self.model_type)
        self.engine.trust_remote_code = trusts_remote_code(self.model_type, self.engine.trust_remote_code)
        if self.model_id_or_path:
            check_remote_code(str(Path(self.model_id_or_path).expanduser()), self.engine.trust_remote_code)
        if self.lora_modules:
            self.engine.enable_lora = True
            for module in self.lora_modules.values():
                module.path = servable_adapter(resolve_path(module.path))  # a Qwen(1) adapter: converted
        return self

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _paths_are_modules(cls, value):
        if isinstance(value, dict):
            return {name: {"path": v} if isinstance(v, str | Path) else v for name, v in value.items()}
        return value

    @property
    def served_name(self) -> str:
        return self.name or self.model_type or Path(self.model_id_or_path).name

    @property
    def is_chat(self) -> bool:
        return MODELS[self.model_type].is_chat if self.model_type in MODELS else True

    @property
    def tool_format(self) -> str | None:
        if self.tool_call_format:
            return self.tool_call_format
        return MODELS[self.model_type].tool_call_format if self.model_type in MODELS else None

    @property
    def sampling_defaults(self) -> dict:
        """What a request that omits temperature/top_p/top_k/repetition_penalty gets."""
        generation = MODELS[self.model_type].generation if self.model_type in MODELS else {}
        return {k: v for k, v in generation.items() if k in ("temperature", "top_p", "top_k", "repetition_penalty")}


class IngressConfig(Strict):
    api_key: str | None = Field(None, description="clients must send `Authorization: Bearer <api_key>` on /v1 routes")
    admin_api_key: str | None = Field(
        None, description="key for the adapter admin routes; required there whenever api_key is set"
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    deployment: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(
            num_replicas=1, max_ongoing_requests=1024, max_queued_requests=-1, num_cpus=0
        )
    )


def default_renderer_replicas() -> int:
    """At most one renderer replica per 4 cores of the node that builds the app (1 on the 2-core CPU
    machine, 4 on a 16-core GPU node), at most 8: renders are short, so a replica per core would mostly
    idle, and each replica holds every model's tokenizer."""
    return max(1, min(8, (os.cpu_count() or 1) // 4))


class RendererConfig(Strict):
    inline_max_chars: int = Field(
        8192,
        ge=0,
        description="requests with up to this many characters of text (all prompts, messages and tools) render "
        "in the ingress's own process unless their adapter ships a chat template; the rest on the Renderer "
        "deployment; 0 sends every render there",
    )
    deployment: DeploymentOptions = Field(
        # Autoscaled on its own queue: a replica is added when renders wait (more than 2 in flight per
        # replica for upscale_delay_s), so long prompts under load do not queue behind one event loop.
        default_factory=lambda: DeploymentOptions(
            autoscaling=AutoscalingOptions(
                min_replicas=1,
                max_replicas=default_renderer_replicas(),
                target_ongoing_requests=2,
                upscale_delay_s=5,
            ),
            max_ongoing_requests=1024,
            max_queued_requests=-1,
            num_cpus=0,
        )
    )


def default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "lorafleet")


class RegistryConfig(Strict):
    """The LoRA registry: where it keeps its state and which folders adapters may come from."""

    state_dir: str = Field(
        default_factory=default_state_dir,
        description="the adapters/ upload folder, and the SQLite state when database_url is unset",
    )
    database_url: str | None = Field(
        None,
        description="postgresql://user:password@host:port/db to keep the registry's records in PostgreSQL "
        "(clusters: the registry may restart on another node); unset: <state_dir>/registry.sqlite",
    )
    allowed_roots: list[str] = Field(
        default_factory=list,
        description="folders adapters may be registered from, and object-store URL prefixes (s3://bucket/prefix); "
        "the startup adapters' folders and <state_dir>/adapters are always allowed",
    )
    ray_actor_options: dict[str, Any] = Field(
        default_factory=dict,
        description="extra Ray actor options of the registry's one replica (e.g. resources that keep it off GPU nodes)",
    )

    @property
    def adapter_cache(self) -> str:
        """Where each node keeps the adapters it downloaded from object stores (by checksum)."""
        return os.path.join(self.state_dir, "adapter-cache")

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("postgresql://", "postgres://", "sqlite:///")):
            raise ValueError("database_url must start with postgresql:// (or sqlite:/// for a file)")
        return url

    @model_validator(mode="after")
    def _absolute(self):
        self.state_dir = resolve_path(self.state_dir)
        self.allowed_roots = [resolve_path(r) for r in self.allowed_roots]
        return self


class AppConfig(Strict):
    """The whole application: `serve_app.app:build_app(args)` validates its args into this."""

    models: list[ModelConfig] = Field(min_length=1, description="served base models")
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    renderer: RendererConfig = Field(default_factory=RendererConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)

    @model_validator(mode="after")
    def _unique_names(self):
        names = [m.served_name for m in self.models]
        adapters = [a for m in self.models for a in m.lora_modules]
        if duplicates := {n for n in names + adapters if (names + adapters).count(n) > 1}:
            raise ValueError(f"model and adapter names must be unique; repeated: {sorted(duplicates)}")
        return self
