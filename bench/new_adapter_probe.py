"""Registration -> first token, split (issue 22's "what bounds it"): how long
`POST /v1/load_lora_adapter` takes, the first streamed token of the new adapter after it, and for
comparison the first token of that adapter once resident and of the base model; medians.

    python bench/new_adapter_probe.py http://127.0.0.1:8000/v1 tiny-chat ADAPTER_DIR [ADAPTER_DIR ...]
    PROBE_GAP_MS=20 python bench/new_adapter_probe.py ...   # a client that waits 20 ms before its first request

Each ADAPTER_DIR is a fresh PEFT adapter of the served model, inside the server's allowed roots.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import httpx


def first_token(client: httpx.Client, url: str, model: str) -> float:
    started = time.perf_counter()
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with client.stream("POST", f"{url}/chat/completions", json=body) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                return time.perf_counter() - started
    raise RuntimeError(f"no token from {model}")


def main() -> None:
    url, base, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
    gap_s = float(os.environ.get("PROBE_GAP_MS", 0)) / 1e3  # between the registration's answer and the request
    parts: dict[str, list[float]] = {"registration": [], "new adapter": [], "resident adapter": [], "base": []}
    with httpx.Client(timeout=120) as client:  # one client, made before any clock starts
        for _ in range(3):
            first_token(client, url, base)  # warm
        for k, path in enumerate(paths):
            name = f"probe-{k}-{time.monotonic_ns()}"
            started = time.perf_counter()
            client.post(f"{url}/load_lora_adapter", json={"lora_name": name, "lora_path": path}).raise_for_status()
            parts["registration"].append(time.perf_counter() - started)
            time.sleep(gap_s)
            parts["new adapter"].append(first_token(client, url, name))
            parts["resident adapter"].append(first_token(client, url, name))
            parts["base"].append(first_token(client, url, base))
    total = [r + f for r, f in zip(parts["registration"], parts["new adapter"])]
    for what, seconds in [*parts.items(), ("registration + new adapter's first token", total)]:
        print(f"{what}: p50 {statistics.median(seconds) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
