"""What structured outputs and tool calls cost: lorafleet against vLLM's own server, same requests.

    .venv/bin/python bench/features.py [--streams 16] [--requests 160] [--out bench/results]

Both servers start as a user starts them: `lorafleet deploy --model_type tiny-chat --max_model_len
1024` (its defaults) and `python -m vllm.entrypoints.openai.api_server --model <tiny-chat>
--max-model-len 1024 --enable-auto-tool-choice --tool-call-parser hermes` (the flags its tool calls
need). Each workload sends the same chat request `--requests` times from `--streams` concurrent
streams (non-streaming, greedy) and counts completed requests and completion tokens per second; a
workload is checked on every reply (the JSON parses, the tool call is there). The table gives each
system's throughput and lorafleet/vLLM per row, so a feature's cost shows as a ratio that moves
away from the plain row's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from side_by_side import MODEL, PORT, ROOT, stop, wait_ready  # noqa: E402

from serve_app.tiny_chat.corpus import WEATHER_QUESTION, WEATHER_TOOL  # noqa: E402

JSON_QUESTION = [{"role": "user", "content": "Give the capital of Zhejiang as JSON."}]
CAPITAL_SCHEMA = {
    "type": "object",
    "properties": {"province": {"type": "string"}, "capital": {"type": "string"}},
    "required": ["province", "capital"],
    "additionalProperties": False,
}
WORKLOADS = {
    "plain chat": {"messages": JSON_QUESTION},
    "json_schema": {
        "messages": JSON_QUESTION,
        "response_format": {"type": "json_schema", "json_schema": {"name": "capital", "schema": CAPITAL_SCHEMA}},
    },
    "tools (auto)": {"messages": [{"role": "user", "content": WEATHER_QUESTION}], "tools": [WEATHER_TOOL]},
    "tools (required)": {
        "messages": [{"role": "user", "content": WEATHER_QUESTION}],
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
    },
}


def check(name: str, reply: dict) -> None:
    message = reply["choices"][0]["message"]
    if name == "json_schema":
        json.loads(message["content"])
    elif name.startswith("tools"):
        assert message["tool_calls"][0]["function"]["name"] == "get_weather", message


async def drive(url: str, name: str, body: dict, streams: int, requests: int) -> dict:
    pending = list(range(requests))
    tokens = 0

    async def stream(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while pending:
            pending.pop()
            reply = await client.post(f"{url}/v1/chat/completions", json=body, timeout=300)
            reply.raise_for_status()
            check(name, reply.json())
            tokens += reply.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=streams)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(stream(client) for _ in range(streams)))
        elapsed = time.perf_counter() - started
    return {"req_s": requests / elapsed, "tok_s": tokens / elapsed}


def start(system: str, out: Path) -> subprocess.Popen:
    if system == "vllm":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", MODEL]
        cmd += ["--served-model-name", "tiny-chat", "--port", str(PORT), "--max-model-len", "1024"]
        cmd += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
        env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"}  # what lorafleet sets for its CPU engines
    else:
        cmd = [str(Path(sys.executable).parent / "lorafleet"), "deploy", "--model_type", "tiny-chat"]
        cmd += ["--max_model_len", "1024", "--port", str(PORT)]
        env = dict(os.environ)
    log = open(out / f"features-{system}.log", "w")  # noqa: SIM115 (lives as long as the server)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{PORT}"
    results: dict[str, dict] = {}
    for system in ("vllm", "lorafleet"):
        proc = start(system, args.out)
        try:
            wait_ready(url, "tiny-chat", proc=proc)
            for name, extra in WORKLOADS.items():
                body = {"model": "tiny-chat", "temperature": 0, "max_tokens": 64, **extra}
                asyncio.run(drive(url, name, body, args.streams, args.streams))  # warm-up (and schema compile)
                results.setdefault(name, {})[system] = asyncio.run(drive(url, name, body, args.streams, args.requests))
                print(system, name, results[name][system], flush=True)
        finally:
            stop(proc)
    lines = [
        f"| workload ({args.streams} streams) | vLLM req/s | lorafleet req/s | vLLM tok/s | lorafleet tok/s | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name, by in results.items():
        v, ours = by["vllm"], by["lorafleet"]
        lines.append(
            f"| {name} | {v['req_s']:.1f} | {ours['req_s']:.1f} | {v['tok_s']:.0f} | {ours['tok_s']:.0f} "
            f"| {ours['tok_s'] / v['tok_s']:.2f}x |"
        )
    table = "\n".join(lines)
    (args.out / "features.md").write_text(table + "\n")
    (args.out / "features.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table)


if __name__ == "__main__":
    main()
