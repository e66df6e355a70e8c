"""LLMServer's stream coalescing: the first token alone, then messages of at least `min_tokens`."""

import asyncio

from deployments.engine_replica.coalesce import coalesce
from serve_app.messages import Delta


async def engine_steps(count: int):
    """One token per engine step, the last one finishing the stream."""
    for i in range(count):
        await asyncio.sleep(0)
        yield [Delta(0, f"t{i} ", (i,), "length" if i == count - 1 else None)]


def messages(count: int, min_tokens) -> list[tuple[int, ...]]:
    async def consume():
        return [
            tuple(t for d in message for t in d.token_ids)
            async for message in coalesce(engine_steps(count), min_tokens)
        ]

    return asyncio.run(consume())


def test_a_fast_consumer_gets_one_message_per_token_without_batching():
    assert messages(5, lambda: 1) == [(0,), (1,), (2,), (3,), (4,)]


def test_under_load_messages_carry_several_tokens_but_the_first_goes_alone():
    got = messages(11, lambda: 3)
    assert got[0] == (0,)
    assert [len(m) for m in got] == [1, 3, 3, 3, 1]  # the last one leaves when the stream ends
    assert [t for m in got for t in m] == list(range(11))


def test_the_batch_size_follows_the_load_as_it_changes():
    load = iter([2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    got = messages(8, lambda: next(load))
    assert got[:2] == [(0,), (1, 2)] and [t for m in got for t in m] == list(range(8))
