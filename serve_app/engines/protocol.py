"""The engine contract shared by the vLLM and pt engines, and the plain data that crosses it.

Everything here is a frozen dataclass of plain values, so it pickles across Ray deployments.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class AdapterRef:
    """An adapter as an engine sees it. A new `adapter_id` means new weights, even for the same name."""

    name: str
    adapter_id: int
    path: str


@dataclass(frozen=True)
class SamplingOptions:
    """Engine-neutral sampling settings; `max_tokens=None` means what is left of the context."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """New output of choice `index` since the previous delta; `finish_reason` is set on its last one."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class ServedBy:
    """Which engine replica took a request and where its adapter stood there, for the ingress' metrics.

    `adapter` is "base" (no adapter), "resident" (already loaded on that replica) or "loaded"
    (this request waited for it to load there): affinity routing shows as few "loaded".
    `first_token_s` is the time on the replica from taking the request to the engine's first token
    (adapter load, engine queue and prefill): the ingress's time to first token minus this and the
    render call is what the hops between deployments cost.
    """

    replica: str
    adapter: str
    first_token_s: float


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    options: SamplingOptions
    adapter: AdapterRef | None = None


class Engine(Protocol):
    """What LLMServer and the offline API need from an engine.

    `generate` yields lists of deltas: every delta produced since the previous yield, so a slow
    consumer receives several tokens in one message instead of falling behind token by token.
    """

    max_model_len: int

    def generate(self, request: GenerationRequest) -> AsyncIterator[list[Delta]]: ...

    async def abort(self, request_id: str) -> None: ...

    async def add_adapter(self, adapter: AdapterRef) -> None: ...

    async def remove_adapter(self, adapter_id: int) -> None: ...

    async def loaded_adapter_ids(self) -> set[int]: ...

    async def num_running(self) -> int: ...

    async def check_health(self) -> None: ...

    def shutdown(self) -> None: ...
