"""The offline Python API, call-compatible with ms-swift's vLLM inference API.

    engine = get_vllm_engine(ModelType.tiny_chat)
    template = get_template(get_default_template_type(ModelType.tiny_chat), engine.hf_tokenizer)
    inference_vllm(engine, template, [{"query": "你好!"}])  # -> [{"response": ..., "history": ...}]

`inference_vllm` / `inference_stream_vllm` take an engine from `get_vllm_engine` or `get_pt_engine`.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import logging
import queue
import threading
import time
import typing
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from lora_registry.adapter_files import check_adapter_fits, inspect_adapter
from serve_app.batch_infer import check_request
from serve_app.config import EngineOptions
from serve_app.engines import lora_slots, lora_targets
from serve_app.engines.pt_engine import PtEngine, PtSettings
from serve_app.engines.vllm_engine import VllmEngine
from serve_app.errors import ConfigError
from serve_app.messages import AdapterRef, GenerationRequest, SamplingOptions
from serve_app.model_types import (
    MODELS,
    check_remote_code,
    get_model_info,
    resolve_model_dir,
    trusts_remote_code,
)
from serve_app.template import Template

logger = logging.getLogger(__name__)


@dataclass
class GenerationConfig:
    """Per-engine defaults, set like `transformers.GenerationConfig` attributes (a name it does not
    have is an AttributeError, not a setting that silently does nothing)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    stop_words: list[str] = field(default_factory=list)
    seed: int | None = None
    do_sample: bool | None = None

    def __setattr__(self, name: str, value) -> None:
        if name not in self.__dataclass_fields__:
            raise AttributeError(
                f"GenerationConfig has no setting '{name}'; it has {', '.join(self.__dataclass_fields__)}."
            )
        super().__setattr__(name, value)

    def to_options(self, template: Template, max_tokens: int) -> SamplingOptions:
        greedy = self.do_sample is False or self.temperature <= 0
        return SamplingOptions(
            max_tokens=max(1, min(self.max_new_tokens, max_tokens)),
            temperature=0.0 if greedy else self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            repetition_penalty=self.repetition_penalty,
            stop=tuple(self.stop_words),
            stop_token_ids=tuple(template.stop_token_ids),
            seed=self.seed,
        )


class _EventLoopThread:
    """A private event loop so synchronous callers can drive an async engine."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="lorafleet-engine-loop", daemon=True)
        self.thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


class OfflineEngine:
    """An engine plus what the offline API needs: a loop, the tokenizer, generation defaults."""

    def __init__(
        self,
        engine,
        loop: _EventLoopThread,
        model_dir: str,
        model_type: str | None,
        config: GenerationConfig,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoTokenizer

        self.engine, self._loop = engine, loop
        self.model_dir, self.model_type = model_dir, model_type
        self.hf_tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        self.generation_config = config
        self.max_model_len: int = engine.max_model_len
        self._checked_adapters: set[tuple[str, int]] = set()
        atexit.register(self.shutdown)  # stop the engine process before the interpreter tears down

    @property
    def is_chat(self) -> bool:
        return MODELS[self.model_type].is_chat if self.model_type in MODELS else True

    def run(self, coro):
        return self._loop.run(coro)

    def adapter_ref(self, lora_request) -> AdapterRef | None:
        """A vLLM `LoRARequest` (or AdapterRef) as an AdapterRef, checked against this model once."""
        if lora_request is None:
            return None
        if isinstance(lora_request, AdapterRef):
            ref = lora_request
        else:
            ref = AdapterRef(lora_request.lora_name, lora_request.lora_int_id, lora_request.lora_path)
        if (ref.path, ref.adapter_id) not in self._checked_adapters:
            self._check_adapter(ref)
            self._checked_adapters.add((ref.path, ref.adapter_id))
        return ref

    def _check_adapter(self, ref: AdapterRef) -> None:
        import json
        from pathlib import Path

        options = getattr(self.engine, "options", None)  # a vLLM engine's; pt applies any adapter
        if options is not None and not options.enable_lora:
            raise ConfigError("this engine was built without LoRA; call get_vllm_engine(..., enable_lora=True).")
        max_rank = options.max_lora_rank if options is not None else 1 << 16
        base_config = json.loads((Path(self.model_dir) / "config.json").read_text())
        check_adapter_fits(inspect_adapter(ref.path, for_vllm=options is not None), base_config, max_rank)

    def shutdown(self) -> None:
        """Stop the engine inside its own loop, then the loop, and let the engine go now.

        Left to the interpreter's exit, vLLM's `AsyncLLM.__del__` ran after its module globals were
        cleared and printed "Exception ignored in AsyncLLM.__del__ ... TypeError", read as a crash."""
        if self.engine is None:
            return
        try:
            if self._loop.loop.is_running():
                future = asyncio.run_coroutine_threadsafe(self._stop_engine(), self._loop.loop)
                future.result(timeout=60)
        finally:
            self._loop.loop.call_soon_threadsafe(self._loop.loop.stop)
            self._loop.thread.join(timeout=30)
            self.engine = None
            gc.collect()  # the engine's reference cycles go while vLLM's modules are still whole

    async def _stop_engine(self) -> None:
        self.engine.shutdown()
        await asyncio.sleep(0)  # the cancelled output handler task ends on this loop


def get_vllm_engine(
    model_type: str | None = None,
    torch_dtype: Any = None,
    *,
    model_id_or_path: str | None = None,
    **engine_options: Any,
) -> OfflineEngine:
    """Start a vLLM engine for `model_type` (or a local checkpoint) and return it ready for inference.

    `engine_options` are the fields of `serve_app.config.EngineOptions`, the same settings as
    `serve_config.yaml`'s `engine:` and the CLI's model flags: tensor_parallel_size,
    gpu_memory_utilization, max_model_len, enforce_eager, enable_lora, max_loras, max_lora_rank,
    max_cpu_loras, max_num_seqs, seed, trust_remote_code (default: what the model type needs) and
    engine_kwargs (any other vLLM AsyncEngineArgs field)."""
    model_dir = resolve_model_dir(model_type, model_id_or_path)
    options = _engine_options(model_type, torch_dtype, engine_options)
    check_remote_code(model_dir, options.trust_remote_code)
    return start_vllm_engine(model_dir, model_type, options)


def start_vllm_engine(
    model_dir: str, model_type: str | None, options: EngineOptions, adapters: Sequence[str] = ()
) -> OfflineEngine:
    """`adapters`: the folders of the adapters the caller will use (they size `max_loras: auto` and
    decide `lora_target_modules: auto`; with none known every module carries LoRA)."""
    hf = lora_slots.hf_config(model_dir, bool(options.trust_remote_code))
    carried = [inspect_adapter(path).target_modules for path in adapters]
    options = lora_targets.with_modules(options, lora_targets.decide(options.lora_target_modules, carried))
    options, _ = lora_slots.resolve(options, model_dir, len(adapters), hf)
    loop = _EventLoopThread()
    engine = loop.run(VllmEngine.start(model_dir, options))
    config = default_generation_config(model_type, model_dir)
    return OfflineEngine(engine, loop, model_dir, model_type, config, bool(options.trust_remote_code))


def _engine_options(model_type: str | None, torch_dtype: Any, given: dict[str, Any]) -> EngineOptions:
    if unknown := sorted(set(given) - set(EngineOptions.model_fields)):
        raise ConfigError(
            f"get_vllm_engine() does not take {unknown}; it takes {sorted(EngineOptions.model_fields)} "
            "(other vLLM engine arguments go in engine_kwargs).",
            param=unknown[0],
        )
    # None where the option takes no None means "the default" (ms-swift passes engine_kwargs=None)
    given = {k: v for k, v in given.items() if v is not None or _takes_none(k)}
    if torch_dtype is not None:
        given = {**given, "dtype": _dtype_name(torch_dtype)}
    options = EngineOptions(**given)
    options.trust_remote_code = trusts_remote_code(model_type, options.trust_remote_code)
    return options


def _takes_none(option: str) -> bool:
    return type(None) in typing.get_args(EngineOptions.model_fields[option].annotation)


def get_pt_engine(
    model_type: str | None = None,
    torch_dtype: Any = None,
    *,
    model_id_or_path: str | None = None,
    max_model_len: int | None = None,
    trust_remote_code: bool | None = None,
    **_: Any,
) -> OfflineEngine:
    """The same API on transformers (+ peft): adapters go in through `lora_request` per call."""
    model_dir = resolve_model_dir(model_type, model_id_or_path)
    dtype = _dtype_name(torch_dtype)
    remote_code = trusts_remote_code(model_type, trust_remote_code)
    check_remote_code(model_dir, remote_code)
    settings = PtSettings(
        model_dir=model_dir,
        dtype="bfloat16" if dtype == "auto" else dtype,
        max_model_len=max_model_len,
        trust_remote_code=remote_code,
    )
    loop = _EventLoopThread()
    engine = loop.run(PtEngine.start(settings))
    config = default_generation_config(model_type, model_dir)
    return OfflineEngine(engine, loop, model_dir, model_type, config, remote_code)


def default_generation_config(model_type: str | None, model_dir: str) -> GenerationConfig:
    """The model type's defaults, else the checkpoint's generation_config.json, else greedy."""
    if model_type:
        info = get_model_info(model_type)
        return GenerationConfig(
            **{k: v for k, v in info.generation.items() if k in GenerationConfig.__dataclass_fields__}
        )
    try:
        from transformers import GenerationConfig as HFGenerationConfig

        hf = HFGenerationConfig.from_pretrained(model_dir)
    except OSError:
        return GenerationConfig()
    return GenerationConfig(
        max_new_tokens=hf.max_new_tokens or 256,
        temperature=hf.temperature if hf.do_sample else 0.0,
        top_p=hf.top_p or 1.0,
        top_k=hf.top_k or -1,
        repetition_penalty=hf.repetition_penalty or 1.0,
    )


def _dtype_name(torch_dtype: Any) -> str:
    if torch_dtype is None:
        return "auto"
    return str(torch_dtype).removeprefix("torch.")


@dataclass
class _Job:
    query: str
    history: list
    request: GenerationRequest
    response: str = ""
    generated_tokens: int = 0
    done: bool = False

    def result(self) -> dict:
        return {"response": self.response, "history": [*self.history, [self.query, self.response]]}


def _jobs(engine: OfflineEngine, template: Template, request_list, generation_config, lora_request) -> list[_Job]:
    config = generation_config or engine.generation_config
    adapter = engine.adapter_ref(lora_request)
    jobs = []
    for k, item in enumerate(request_list):
        check_request(f"request_list[{k}]", item)
        history = [list(turn) for turn in item.get("history") or []]
        ids, used = template.encode(item["query"], history, item.get("system"), max_length=engine.max_model_len - 1)
        if len(used) < len(history):
            logger.warning("history trimmed to the last %d of %d turns to fit the context", len(used), len(history))
        options = config.to_options(template, engine.max_model_len - len(ids))
        request = GenerationRequest(f"offline-{uuid.uuid4().hex}", tuple(ids), options, adapter)
        jobs.append(_Job(item["query"], history, request))
    return jobs


async def _drive(engine, job: _Job, on_update) -> None:
    async for deltas in engine.generate(job.request):
        for delta in deltas:
            job.response += delta.text
            job.generated_tokens += len(delta.token_ids)
        on_update(job)
    job.done = True
    on_update(job)


def _fill_info(info: dict | None, jobs: list[_Job], started: float) -> None:
    if info is None:
        return
    runtime = time.perf_counter() - started
    generated = sum(j.generated_tokens for j in jobs)
    info.update(
        num_prompt_tokens=sum(len(j.request.prompt_ids) for j in jobs),
        num_generated_tokens=generated,
        num_samples=len(jobs),
        runtime=runtime,
        samples_per_second=len(jobs) / runtime,
        tokens_per_second=generated / runtime,
    )


def inference_vllm(
    llm_engine: OfflineEngine,
    template: Template,
    request_list: list[dict],
    *,
    generation_config: GenerationConfig | None = None,
    lora_request=None,
    generation_info: dict | None = None,
    use_tqdm: bool = False,
    verbose: bool = False,
    **_: Any,
) -> list[dict]:
    """Answer every request (`query`, optional `history`, `system`) in one engine batch."""
    started = time.perf_counter()
    jobs = _jobs(llm_engine, template, request_list, generation_config, lora_request)
    progress = _progress(len(jobs)) if use_tqdm else None

    def on_update(job):
        if job.done and progress is not None:
            progress.update(1)

    async def run_all():
        await asyncio.gather(*(_drive(llm_engine.engine, job, on_update) for job in jobs))

    llm_engine.run(run_all())
    if progress is not None:
        progress.close()
    _fill_info(generation_info, jobs, started)
    if verbose:
        for job in jobs:
            print(f"query: {job.query}\nresponse: {job.response}")
    return [job.result() for job in jobs]


def inference_stream_vllm(
    llm_engine: OfflineEngine,
    template: Template,
    request_list: list[dict],
    *,
    generation_config: GenerationConfig | None = None,
    lora_request=None,
    generation_info: dict | None = None,
    **_: Any,
) -> Iterator[list[dict]]:
    """Yield the list of results as it grows; the last list equals `inference_vllm`'s result."""
    started = time.perf_counter()
    jobs = _jobs(llm_engine, template, request_list, generation_config, lora_request)
    updates: queue.Queue = queue.Queue()

    async def run_all():
        try:
            await asyncio.gather(*(_drive(llm_engine.engine, job, lambda j: updates.put(j)) for job in jobs))
        finally:
            updates.put(None)

    future = asyncio.run_coroutine_threadsafe(run_all(), llm_engine._loop.loop)
    try:
        for _ in iter(updates.get, None):
            yield [job.result() for job in jobs]
        future.result()
    finally:
        future.cancel()
    _fill_info(generation_info, jobs, started)


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="inference", unit="req")


__all__ = [
    "GenerationConfig",
    "OfflineEngine",
    "get_pt_engine",
    "get_vllm_engine",
    "inference_stream_vllm",
    "inference_vllm",
]
