"""Following the registry by long-poll: the ingress and every engine replica keep a local copy."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from lora_registry.adapter_store import RegistryState
from serve_app.platform import replica_logger

logger = replica_logger(__name__)


async def follow_registry(
    registry, on_state: Callable[[RegistryState], Awaitable[None]], version: str = "", timeout_s: float = 30.0
) -> None:
    """Call `on_state` with each new registry state, and at least every `timeout_s` (a heartbeat).
    Runs until cancelled; an unreachable registry (restarting) is retried every second."""
    while True:
        try:
            state = await registry.listen.remote(version, timeout_s)
        except Exception:
            logger.warning("registry unreachable; retrying", exc_info=True)
            await asyncio.sleep(1)
            continue
        version = state.version
        await on_state(state)
