"""The pt engine: transformers (+ peft for adapters), one request at a time.

For correctness and for models vLLM cannot run; it is not built for throughput. Generation runs in
a worker thread and hands token ids to the event loop as they are sampled.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from serve_app.errors import InvalidRequestError
from serve_app.messages import AdapterRef, Delta, GenerationRequest, SamplingOptions
from serve_app.model_types import context_length


@dataclass(frozen=True)
class PtSettings:
    model_dir: str
    dtype: str = "bfloat16"
    max_model_len: int | None = None
    device: str | None = None
    trust_remote_code: bool = False


class _StopFlag:
    """A transformers StoppingCriteria the consumer can trip (stop string hit, client gone)."""

    def __init__(self):
        self.stopped = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.stopped.is_set(), dtype=torch.bool)


class PtEngine:
    """Owns a transformers model; adapters are peft adapters loaded by name on that model."""

    def __init__(self, settings: PtSettings):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.settings = settings
        self.tokenizer = AutoTokenizer.from_pretrained(settings.model_dir, trust_remote_code=settings.trust_remote_code)
        device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(
            settings.model_dir, dtype=getattr(torch, settings.dtype), trust_remote_code=settings.trust_remote_code
        )
        self.model.to(device).eval()
        self.max_model_len = context_length(settings.model_dir, settings.max_model_len, settings.trust_remote_code)
        self._adapters: dict[int, str] = {}  # adapter_id -> peft adapter name
        self._lock = asyncio.Lock()
        self._stops: dict[str, _StopFlag] = {}

    @classmethod
    async def start(cls, settings: PtSettings) -> PtEngine:
        return await asyncio.to_thread(cls, settings)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[list[Delta]]:
        _refuse_unsupported(request.options)
        if request.adapter is not None and request.adapter.adapter_id not in self._adapters:
            await self.add_adapter(request.adapter)
        async with self._lock:
            for index in range(request.options.n):
                async for delta in self._generate_one(request, index):
                    yield [delta]

    async def _generate_one(self, request: GenerationRequest, index: int) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        flag = self._stops[request.request_id] = _StopFlag()

        def push(item):
            loop.call_soon_threadsafe(queue.put_nowait, item)

        worker = loop.run_in_executor(None, self._run_generate, request, index, flag, push)
        detok = _IncrementalText(self.tokenizer, request.options.stop)
        try:
            while (token_id := await queue.get()) is not None:
                text, stop_hit = detok.add(token_id)
                if stop_hit:
                    yield Delta(index, text, (token_id,), "stop")
                    return
                yield Delta(index, text, (token_id,))
            yield Delta(index, detok.flush(), (), await worker)
        finally:
            flag.stopped.set()
            self._stops.pop(request.request_id, None)
            await asyncio.shield(worker)  # the model is not shared until this thread is done

    def _run_generate(self, request: GenerationRequest, index: int, flag: _StopFlag, push) -> str:
        """Runs in a worker thread; pushes each new token id, then None. Returns the finish reason."""
        import torch
        from transformers import StoppingCriteriaList

        options = request.options
        prompt = torch.tensor([list(request.prompt_ids)], device=self.model.device)
        max_new = options.max_tokens or max(self.max_model_len - prompt.shape[1], 1)
        streamer = _TokenPusher(push)
        try:
            with torch.no_grad(), self._adapter_context(request.adapter):
                if options.seed is not None:
                    torch.manual_seed(options.seed + index)
                out = self.model.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([flag]),
                    max_new_tokens=max_new,
                    **_hf_sampling(options, self._eos_ids(options), max_new),
                )
        finally:
            push(None)
        generated = out.shape[1] - prompt.shape[1]
        return "length" if generated >= max_new else "stop"

    def _eos_ids(self, options: SamplingOptions) -> list[int]:
        ids = self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        return ids + list(options.stop_token_ids)

    def _adapter_context(self, adapter: AdapterRef | None):
        import contextlib

        if not self._adapters:
            return contextlib.nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(self._adapters[adapter.adapter_id])
        return contextlib.nullcontext()

    async def add_adapter(self, adapter: AdapterRef) -> None:
        async with self._lock:
            await asyncio.to_thread(self._load_adapter, adapter)

    def _load_adapter(self, adapter: AdapterRef) -> None:
        from peft import PeftModel

        name = f"{adapter.name}-{adapter.adapter_id}"
        if not self._adapters:
            self.model = PeftModel.from_pretrained(self.model, adapter.path, adapter_name=name)
        else:
            self.model.load_adapter(adapter.path, adapter_name=name)
        self.model.eval()
        self._adapters[adapter.adapter_id] = name

    async def remove_adapter(self, adapter_id: int) -> None:
        async with self._lock:
            if name := self._adapters.pop(adapter_id, None):
                self.model.delete_adapter(name)

    async def loaded_adapter_ids(self) -> set[int]:
        return set(self._adapters)

    async def num_running(self) -> int:
        return len(self._stops)

    async def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        return None


class _TokenPusher:
    """transformers streamer: skips the prompt, pushes each generated token id."""

    def __init__(self, push):
        self.push, self.prompt_seen = push, False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():
            self.push(int(token_id))

    def end(self):
        pass


class _IncrementalText:
    """Detokenizes a growing id list, holding back partial UTF-8 and checking stop strings."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0

    def add(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for word in self.stop:
            if (at := text.find(word, max(self.sent - len(word), 0))) >= 0:
                return self._emit(text[:at]), True
        return ("" if text.endswith("\ufffd") else self._emit(text)), False

    def flush(self) -> str:
        return self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _emit(self, text: str) -> str:
        new, self.sent = text[self.sent :], max(self.sent, len(text))
        return new


# SamplingOptions fields that only the vLLM engine acts on: field -> its "not asked for" value.
_VLLM_ONLY = {
    "logprobs": None,
    "prompt_logprobs": None,
    "structured": None,
    "logit_bias": (),
    "include_stop_str_in_output": False,
    "priority": 0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}


def _refuse_unsupported(options: SamplingOptions) -> None:
    for name, unset in _VLLM_ONLY.items():
        if getattr(options, name) != unset:
            shown = "response_format/structured_outputs/tool_choice" if name == "structured" else name
            raise InvalidRequestError(
                f"`{shown}` is not supported by the pt backend; serve this model with infer_backend vllm.", param=name
            )


def _hf_sampling(options: SamplingOptions, eos_ids: list[int], max_new: int) -> dict:
    # ignore_eos: transformers masks the EOS ids until min_new_tokens, so ask for all of them
    min_new = max_new if options.ignore_eos else options.min_tokens
    kwargs = dict(eos_token_id=eos_ids, pad_token_id=(eos_ids or [0])[0], min_new_tokens=min_new or None)
    if options.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = options.repetition_penalty
    if options.temperature <= 0:
        return {**kwargs, "do_sample": False}
    return {
        **kwargs,
        "do_sample": True,
        "temperature": options.temperature,
        "top_p": options.top_p,
        "top_k": options.top_k or None,
        "min_p": options.min_p or None,
    }
