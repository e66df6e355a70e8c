"""Many streaming clients at once, a share of them hanging up mid-stream at random points.

    .venv/bin/python bench/disconnect_load.py --base-url http://127.0.0.1:8000 --model tiny-chat

Every client that stays must get its whole answer with correct `usage`; the ones that leave must
not leave work behind. Prints what it tried and what held; exits 1 if something did not. The
engine-side checks (no running requests, memory back to its baseline) need a Serve handle, so
tests/serve/test_load_disconnects.py runs `run_load` next to them. Loopback only, bounded in
clients, tokens and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Outcome:
    completed: int = 0
    disconnected: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


async def one_client(client: httpx.AsyncClient, url: str, model: str, max_tokens: int, leave_after: int | None):
    """Returns 'completed' or 'disconnected', or a problem description."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"count to {random.randint(1, 99)}"}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "logprobs": True,  # one logprob entry per generated token: the client's own token count
    }
    tokens, usage = 0, None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return f"status {response.status_code}: {(await response.aread())[:200]!r}"
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return f"in-band error: {event['error']}"
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or ():
                tokens += len((choice.get("logprobs") or {}).get("content") or ())
            if leave_after is not None and tokens >= leave_after:
                return "disconnected"  # leaving the `async with` closes the connection mid-stream
    if usage is None or usage.get("completion_tokens") != tokens or tokens != max_tokens:
        return f"usage {usage}: {tokens} tokens streamed, {max_tokens} asked for with ignore_eos"
    if usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]:
        return f"usage {usage} does not add up"
    return "completed"


async def run_load(
    url: str, model: str, clients: int = 256, leave_share: float = 0.2, max_tokens: int = 32, seed: int = 0
) -> Outcome:
    random.seed(seed)
    plans = [random.randint(1, max_tokens - 2) if random.random() < leave_share else None for _ in range(clients)]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(120), limits=limits) as client:
        results = await asyncio.gather(
            *(one_client(client, url, model, max_tokens, plan) for plan in plans), return_exceptions=True
        )
    outcome = Outcome(seconds=time.perf_counter() - started)
    for r in results:
        if r == "completed":
            outcome.completed += 1
        elif r == "disconnected":
            outcome.disconnected += 1
        else:
            outcome.problems.append(repr(r))
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="tiny-chat")
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--leave-share", type=float, default=0.2)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    if not args.base_url.startswith(("http://127.", "http://localhost")):
        sys.exit("loopback only")
    o = asyncio.run(run_load(args.base_url, args.model, args.clients, args.leave_share, args.max_tokens))
    print(
        f"{args.clients} streaming clients, {args.leave_share:.0%} set to hang up: {o.completed} completed with "
        f"correct usage, {o.disconnected} hung up, {len(o.problems)} problems, {o.seconds:.1f} s"
    )
    for p in o.problems[:10]:
        print("  problem:", p)
    sys.exit(1 if o.problems else 0)


if __name__ == "__main__":
    main()
