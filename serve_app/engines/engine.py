"""The engine contract shared by the vLLM and pt engines."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from serve_app.messages import AdapterRef, Delta, GenerationRequest


class Engine(Protocol):
    """What LLMServer and the offline API need from an engine.

    `generate` yields lists of deltas: every delta produced since the previous yield, so a slow
    consumer receives several tokens in one message instead of falling behind token by token.
    """

    max_model_len: int

    def generate(self, request: GenerationRequest) -> AsyncIterator[list[Delta]]: ...

    async def add_adapter(self, adapter: AdapterRef) -> None: ...

    async def remove_adapter(self, adapter_id: int) -> None: ...

    async def loaded_adapter_ids(self) -> set[int]: ...

    async def num_running(self) -> int: ...

    async def check_health(self) -> None: ...

    def shutdown(self) -> None: ...
