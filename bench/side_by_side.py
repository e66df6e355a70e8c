"""Side-by-side serving benchmark: vLLM's own OpenAI server vs lorafleet, same model and engine args.

    .venv/bin/python bench/side_by_side.py [--concurrency 1 16 64] [--out bench/results]

Starts each server in turn on this machine, drives it with vLLM's load generator
(`vllm.benchmarks.serve`: streaming chat, random prompts, fixed lengths, ignore_eos, warm-ups), and
prints a markdown table of output tok/s, TTFT p50/p99 and TPOT p50 with ratios to vLLM measured in
the same run. JSON per run goes to --out. (Ray Serve LLM and the multi-LoRA workload: not yet.)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "serve_app" / "assets" / "tiny-chat")
PORT = 8400


def wait_ready(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not come up in {timeout} s")


def start_vllm(args) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        MODEL,
        "--served-model-name",
        "tiny-chat",
        "--port",
        str(PORT),
        "--max-model-len",
        str(args.max_model_len),
        "--no-enable-prefix-caching",
    ]
    log = open(Path(args.out) / "vllm-server.log", "w")  # noqa: SIM115 (lives as long as the server)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}  # what lorafleet sets for its CPU engines
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def start_lorafleet(args, state: Path) -> subprocess.Popen:
    config = {
        "models": [
            {
                "model_type": "tiny-chat",
                "engine": {"max_model_len": args.max_model_len, "engine_kwargs": {"enable_prefix_caching": False}},
                "deployment": {"num_replicas": 1, "max_ongoing_requests": 256},
            }
        ],
        "registry": {"state_dir": str(state)},
    }
    code = (
        "import json,sys,time,ray; from ray import serve; from serve_app.app import build_app;"
        f"ray.init(num_cpus=4, include_dashboard=False); serve.start(http_options={{'host':'127.0.0.1','port':{PORT}}});"
        f"serve.run(build_app(json.loads({json.dumps(json.dumps(config))})), name='bench', route_prefix='/');"
        "time.sleep(10**6)"
    )
    log = open(Path(args.out) / "lorafleet-server.log", "w")  # noqa: SIM115 (lives as long as the server)
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
    )


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)


def load(system: str, concurrency: int, args, out: Path) -> dict:
    name = f"{system}-c{concurrency}.json"
    cmd = [
        sys.executable,
        "-c",
        "import sys; from vllm.benchmarks.serve import main, add_cli_args; import argparse;"
        "p=argparse.ArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))",
        "--backend",
        "openai-chat",
        "--endpoint",
        "/v1/chat/completions",
        "--base-url",
        f"http://127.0.0.1:{PORT}",
        "--model",
        "tiny-chat",
        "--tokenizer",
        MODEL,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--ignore-eos",
        "--num-prompts",
        str(max(concurrency * args.rounds, 16)),
        "--max-concurrency",
        str(concurrency),
        "--num-warmups",
        str(min(concurrency, 8)),
        "--seed",
        str(int(time.time()) % 100000),
        "--percentile-metrics",
        "ttft,tpot",
        "--metric-percentiles",
        "50,99",
        "--save-result",
        "--result-dir",
        str(out),
        "--result-filename",
        name,
    ]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return json.loads((out / name).read_text())


def table(results: dict) -> str:
    rows = [
        "| system | concurrency | output tok/s | ratio to vLLM | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for (system, c), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0] != "vllm")):
        ratio = (
            r["output_throughput"] / results[("vllm", c)]["output_throughput"]
            if ("vllm", c) in results
            else float("nan")
        )
        rows.append(
            f"| {system} | {c} | {r['output_throughput']:.0f} | {ratio:.2f}x | {r['p50_ttft_ms']:.1f} | {r['p99_ttft_ms']:.1f} | {r['p50_tpot_ms']:.2f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="requests per concurrency slot")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for system, start in [
        ("vllm", lambda: start_vllm(args)),
        ("lorafleet", lambda: start_lorafleet(args, args.out / "state")),
    ]:
        proc = start()
        try:
            wait_ready(f"http://127.0.0.1:{PORT}")
            for c in args.concurrency:
                results[(system, c)] = load(system, c, args, args.out)
                print(f"{system} c={c}: {results[(system, c)]['output_throughput']:.0f} tok/s", flush=True)
        finally:
            stop(proc)
    print(table(results))


if __name__ == "__main__":
    main()
