"""Merging the deltas that pile up while a consumer is busy into one message."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from serve_app.messages import Delta


async def coalesce(source: AsyncIterator[list[Delta]], min_tokens=lambda: 1) -> AsyncIterator[list[Delta]]:
    """Re-yield `source`, merging deltas that arrive while the consumer is busy into one message.

    After the first message, a message waits for `min_tokens()` tokens (or the end of the stream)."""
    waiting: list[Delta] = []
    wake = asyncio.Event()
    first = True

    def ready() -> bool:
        if not waiting:
            return False
        if first or any(d.finish_reason for d in waiting):
            return True
        return sum(len(d.token_ids) for d in waiting) >= min_tokens()

    async def pump():
        try:
            async for deltas in source:
                waiting.extend(deltas)
                wake.set()
        finally:
            wake.set()

    task = asyncio.create_task(pump())
    try:
        while True:
            if not ready() and not task.done():
                wake.clear()
                await wake.wait()
                continue
            if waiting:
                batch = waiting.copy()
                waiting.clear()
                first = False
                yield merge_deltas(batch)
            elif task.done():
                task.result()  # re-raise an engine error
                return
    finally:
        task.cancel()  # a client that went away: closing the source aborts the engine request
        with contextlib.suppress(asyncio.CancelledError):
            await task


def merge_deltas(deltas: list[Delta]) -> list[Delta]:
    """One delta per choice index, in order."""
    merged: dict[int, Delta] = {}
    for d in deltas:
        if (m := merged.get(d.index)) is None:
            merged[d.index] = d
            continue
        logprobs = None if m.logprobs is None and d.logprobs is None else (m.logprobs or ()) + (d.logprobs or ())
        merged[d.index] = Delta(
            d.index,
            m.text + d.text,
            m.token_ids + d.token_ids,
            d.finish_reason or m.finish_reason,
            logprobs,
            m.prompt_logprobs or d.prompt_logprobs,
        )
    return [merged[i] for i in sorted(merged)]
