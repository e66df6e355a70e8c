"""The vLLM engine: one `AsyncLLM`, driven with token ids. Uses vLLM's public API only."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from serve_app.engines import lora_slots, lora_warmup
from serve_app.errors import InvalidRequestError
from serve_app.messages import AdapterRef, Delta, GenerationRequest, SamplingOptions, StructuredOutput, TokenLogprob
from serve_app.platform import gpu_names, prepare_vllm_env, private_rpc_dir, replica_logger, use_tuned_lora_kernels

if TYPE_CHECKING:
    from serve_app.config import EngineOptions

logger = replica_logger("engines.vllm_engine")


def engine_args(model_dir: str, options: EngineOptions):
    """vLLM's `AsyncEngineArgs` for this checkpoint and lorafleet's engine options."""
    from vllm import AsyncEngineArgs

    kwargs = {"model": model_dir, "tokenizer": model_dir, "disable_log_stats": True, **options.vllm_kwargs()}
    if options.tensor_parallel_size > 1:
        # Local worker processes on the devices this process holds (see
        # LLMServer.get_deployment_options); inside a Ray actor vLLM would pick its Ray executor.
        kwargs.setdefault("distributed_executor_backend", "mp")
    return AsyncEngineArgs(**kwargs)


class VllmEngine:
    """Owns a vLLM `AsyncLLM`. Build it inside a running event loop (`await VllmEngine.start(...)`)."""

    def __init__(self, options: EngineOptions, async_llm, rpc_dir: str | None = None):
        self.options = options
        self.llm = async_llm
        self.max_model_len: int = async_llm.model_config.max_model_len
        self._running: set[str] = set()
        self.rpc_dir = rpc_dir  # the folder of its socket files, when lorafleet chose it

    @classmethod
    async def start(cls, model_dir: str, options: EngineOptions) -> VllmEngine:
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        prepare_vllm_env(options.tensor_parallel_size)
        tuned_kernels = use_tuned_lora_kernels(model_dir) if options.enable_lora else None
        # The defaults of vLLM's own OpenAI server, not of an embedded engine: on an H100/H200 that
        # is 8192 tokens per step and 1024 sequences instead of 2048 and 128. With 2048 a burst of
        # 16 prompts of 512 tokens prefills over four steps, and the last of them waits for the
        # other three (H100: TTFT p99 317 vs vLLM's 239 ms at 16 streams, docs/benchmarks.md).
        # No local names the AsyncLLM: modules that vLLM imports lazily in there keep their importers'
        # frames (this one too) for the life of the process, and a local would keep the engine alive
        # until the interpreter's teardown, where its __del__ fails on cleared module globals.
        with private_rpc_dir() as rpc_dir:
            engine = cls(
                options,
                AsyncLLM.from_engine_args(
                    engine_args(model_dir, options), usage_context=UsageContext.OPENAI_API_SERVER
                ),
                rpc_dir,
            )
        if tuned_kernels:
            await engine.warm_lora_kernels(model_dir, tuned_kernels, gpu_names()[0])
        return engine

    async def warm_lora_kernels(self, model_dir: str, kernel_configs: str, gpu_name: str) -> float | None:
        """Compile the LoRA kernel variants of these configs before serving (lora_warmup): the
        seconds it took, or None where it could not run (the kernels then compile in the first
        requests that meet them). Never fails the engine."""
        try:
            lengths = self.warmup_lengths(kernel_configs, gpu_name)
            took = await self._prefill_with_zero_adapter(model_dir, lengths)
        except Exception as e:  # noqa: BLE001 - a warm-up that fails costs speed, never the engine
            logger.warning("LoRA kernels not compiled at start (%s: %s)", type(e).__name__, e)
            return None
        if took is not None:
            logger.info("LoRA kernels compiled for %d prompt lengths %s in %.1f s", len(lengths), lengths, took)
        return took

    def warmup_lengths(self, kernel_configs: str, gpu_name: str) -> list[int]:
        """lora_warmup.token_counts for this engine's step limit and CUDA-graph sizes. A step can
        also be longer than one prompt (several requests, when the context is shorter than the step
        limit); those sizes are not warmed."""
        config = self.llm.vllm_config
        step_limit = min(self.max_model_len - 1, config.scheduler_config.max_num_batched_tokens)
        graphs = getattr(config.compilation_config.cudagraph_mode, "name", "NONE") != "NONE"
        captured = (
            config.compilation_config.cudagraph_capture_sizes if graphs and not self.options.enforce_eager else []
        )
        return lora_warmup.token_counts(kernel_configs, gpu_name, step_limit, list(captured or []))

    async def _prefill_with_zero_adapter(self, model_dir: str, lengths: list[int]) -> float | None:
        """One prefill per length, one at a time, with lora_warmup's zero adapter; the seconds."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        started = time.perf_counter()
        config = lora_slots.hf_config(model_dir, bool(self.options.trust_remote_code))
        rank = min(8, self.options.max_lora_rank)
        folder = lora_warmup.weightless_adapter(config, self.options.lora_target_modules, rank)
        if folder is None:
            logger.warning("LoRA kernels not compiled at start: no module of this checkpoint's layout to warm with")
            return None
        adapter = AdapterRef("lorafleet-warmup", lora_warmup.WARMUP_ADAPTER_ID, folder)
        try:
            await self.add_adapter(adapter)
            params = SamplingParams(max_tokens=1, ignore_eos=True)
            for i, length in enumerate(lengths):
                prompt = TokensPrompt(prompt_token_ids=lora_warmup.warmup_prompt(i, length))
                lora = self._lora_request(adapter)
                async for _ in self.llm.generate(prompt, params, f"lorafleet-warmup-{i}", lora_request=lora):
                    pass
        finally:
            with contextlib.suppress(Exception):  # its slot is free for the adapters served
                await self.remove_adapter(adapter.adapter_id)
            shutil.rmtree(folder, ignore_errors=True)
        return time.perf_counter() - started

    async def generate(self, request: GenerationRequest) -> AsyncIterator[list[Delta]]:
        from vllm.inputs import TokensPrompt

        options = request.options
        with _refused_by_engine():
            params = self._sampling_params(options, len(request.prompt_ids))
        stream = self.llm.generate(
            TokensPrompt(prompt_token_ids=list(request.prompt_ids)),
            params,
            request.request_id,
            lora_request=self._lora_request(request.adapter),
            priority=options.priority,
        )
        self._running.add(request.request_id)
        try:
            with _refused_by_engine():  # vLLM validates the request when it takes it, before any output
                output = await anext(stream, None)
            prompt_logprobs = _prompt_logprobs(output) if options.prompt_logprobs is not None else None
            while output is not None:
                deltas = [_delta(c) for c in output.outputs if c.token_ids or c.finish_reason]
                if prompt_logprobs is not None:
                    deltas = _with_prompt_logprobs(deltas, prompt_logprobs)
                    prompt_logprobs = None
                if deltas:
                    yield deltas
                output = await anext(stream, None)
        finally:
            self._running.discard(request.request_id)
            await stream.aclose()  # a consumer that left early: vLLM aborts the request

    async def add_adapter(self, adapter: AdapterRef) -> None:
        await self.llm.add_lora(self._lora_request(adapter))

    async def remove_adapter(self, adapter_id: int) -> None:
        await self.llm.remove_lora(adapter_id)

    async def loaded_adapter_ids(self) -> set[int]:
        if not self.options.enable_lora:
            return set()  # asking vLLM would raise in its workers, which kills a multi-process engine
        return set(await self.llm.list_loras())

    async def num_running(self) -> int:
        return len(self._running)  # counted here: vLLM 0.25.1's AsyncLLM has no public count

    async def check_health(self) -> None:
        await self.llm.check_health()

    def shutdown(self) -> None:
        self.llm.shutdown()
        if self.rpc_dir:
            shutil.rmtree(self.rpc_dir, ignore_errors=True)

    def _lora_request(self, adapter: AdapterRef | None):
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(adapter.name, adapter.adapter_id, adapter.path)

    def _sampling_params(self, options: SamplingOptions, prompt_len: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        max_tokens = options.max_tokens or max(self.max_model_len - prompt_len, 1)
        return SamplingParams(
            n=options.n,
            max_tokens=max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            min_p=options.min_p,
            repetition_penalty=options.repetition_penalty,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
            stop=list(options.stop),
            stop_token_ids=list(options.stop_token_ids),
            seed=options.seed,
            logprobs=options.logprobs,
            ignore_eos=options.ignore_eos,
            min_tokens=options.min_tokens,
            logit_bias=dict(options.logit_bias) or None,
            include_stop_str_in_output=options.include_stop_str_in_output,
            structured_outputs=_structured_outputs(options.structured),
            prompt_logprobs=options.prompt_logprobs,
            output_kind=RequestOutputKind.DELTA,
        )


@contextlib.contextmanager
def _refused_by_engine():
    """vLLM's validation errors (a stop token out of the vocabulary, a schema its structured-output
    backend cannot compile, ...) are the request's fault: a 400 with vLLM's message. vLLM 0.25.1
    raises them as ValueError, 0.32 as VLLMValidationError (no longer a ValueError)."""
    from vllm.exceptions import VLLMValidationError

    try:
        yield
    except (ValueError, TypeError, VLLMValidationError) as e:
        if isinstance(e, InvalidRequestError):
            raise
        message = str(e) if len(str(e)) <= 600 else str(e)[:600] + " ..."  # vLLM lists every bad token id
        raise InvalidRequestError(
            f"the engine refused the request: {message}", param=getattr(e, "parameter", None)
        ) from None


def _structured_outputs(spec: StructuredOutput | None):
    if spec is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    kind = dict(
        json=spec.json,
        regex=spec.regex,
        choice=list(spec.choice) if spec.choice else None,
        grammar=spec.grammar,
        structural_tag=spec.structural_tag,
    )
    return StructuredOutputsParams(**({k: v for k, v in kind.items() if v is not None} or {"json_object": True}))


def _prompt_logprobs(output) -> tuple:
    """vLLM's prompt logprobs as JSON-ready values: None for the first token, then per token
    {token id as text: {"logprob", "rank", "decoded_token"}}."""
    if output is None or output.prompt_logprobs is None:
        return ()
    return tuple(
        None
        if position is None
        else {
            str(token_id): {"logprob": float(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
            for token_id, lp in position.items()
        }
        for position in output.prompt_logprobs
    )


def _with_prompt_logprobs(deltas: list[Delta], prompt_logprobs: tuple) -> list[Delta]:
    if deltas and deltas[0].index == 0:
        return [dataclasses.replace(deltas[0], prompt_logprobs=prompt_logprobs), *deltas[1:]]
    return [Delta(index=0, text="", token_ids=(), prompt_logprobs=prompt_logprobs), *deltas]


def _delta(completion) -> Delta:
    logprobs = None
    if completion.logprobs is not None:
        logprobs = tuple(_token_logprob(tid, pos) for tid, pos in zip(completion.token_ids, completion.logprobs))
    return Delta(
        index=completion.index,
        text=completion.text,
        token_ids=tuple(completion.token_ids),
        finish_reason=completion.finish_reason,
        logprobs=logprobs,
    )


def _token_logprob(token_id: int, position: dict) -> TokenLogprob:
    chosen = position[token_id]
    top = sorted(position.values(), key=lambda lp: lp.rank or 0)
    return TokenLogprob(
        token=chosen.decoded_token or "",
        logprob=float(chosen.logprob),
        top=tuple((lp.decoded_token or "", float(lp.logprob)) for lp in top),
    )
