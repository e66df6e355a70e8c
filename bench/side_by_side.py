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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from serve_app.platform import has_nvidia_gpu  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "serve_app" / "assets" / "tiny-chat")
PORT = 8400


def wait_ready(url: str, name: str, timeout: float = 900) -> None:
    """Until a one-token chat completion answers (lorafleet's ingress is up before its engine)."""
    body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).status_code == 200:
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
        str(args.model_dir),
        "--served-model-name",
        args.name,
        "--port",
        str(PORT),
        "--max-model-len",
        str(args.max_model_len),
        "--tensor-parallel-size",
        str(args.tp),
        "--dtype",
        args.dtype,
        "--seed",
        "0",
        "--no-enable-prefix-caching",
    ]
    if args.load_format:
        cmd += ["--load-format", args.load_format]
    if args.max_num_seqs:
        cmd += ["--max-num-seqs", str(args.max_num_seqs)]
    if args.enforce_eager:
        cmd += ["--enforce-eager"]
    if args.gpu:
        cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    log = open(Path(args.out) / "vllm-server.log", "w")  # noqa: SIM115 (lives as long as the server)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}  # what lorafleet sets for its CPU engines
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def start_lorafleet(args, state: Path) -> subprocess.Popen:
    engine = {
        "tensor_parallel_size": args.tp,
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "enforce_eager": args.enforce_eager,
        "engine_kwargs": {"enable_prefix_caching": False}
        | ({"load_format": args.load_format} if args.load_format else {}),
    }
    if args.gpu:
        engine["gpu_memory_utilization"] = args.gpu_memory_utilization
    model = (
        {"model_type": "tiny-chat"}
        if Path(args.model_dir) == Path(MODEL)
        else {"name": args.name, "model_id_or_path": str(args.model_dir), "template_type": args.template}
    )
    config = {
        "models": [model | {"engine": engine, "deployment": {"num_replicas": 1, "max_ongoing_requests": 256}}],
        "registry": {"state_dir": str(state)},
    }
    code = (
        "import json,sys,time,ray; from ray import serve; from serve_app.app import build_app;"
        f"ray.init(num_cpus={max(8, os.cpu_count())}, include_dashboard=False);"
        f"serve.start(http_options={{'host':'127.0.0.1','port':{PORT}}});"
        f"serve.run(build_app(json.loads({json.dumps(json.dumps(config))})), name='bench', route_prefix='/');"
        "time.sleep(10**6)"
    )
    log = open(Path(args.out) / "lorafleet-server.log", "w")  # noqa: SIM115 (lives as long as the server)
    env = os.environ | dict(kv.split("=", 1) for kv in args.serve_env)
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT, env=env
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
        args.name,
        "--tokenizer",
        str(args.model_dir),
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
    with open(out / f"{system}-c{concurrency}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
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
    parser.add_argument("--model-dir", type=Path, default=Path(MODEL), help="checkpoint or shape folder")
    parser.add_argument("--name", help="served model name (default: the folder's name)")
    parser.add_argument("--template", default="qwen", help="lorafleet template type for --model-dir")
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size on both")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-num-seqs", type=int)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--load-format", help="e.g. dummy: random weights of the real shape")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument(
        "--serve-env", nargs="*", default=[], metavar="KEY=VALUE", help="environment of lorafleet's Ray cluster"
    )
    parser.add_argument("--systems", nargs="+", default=["vllm", "lorafleet"], choices=["vllm", "lorafleet"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    args.name = args.name or ("tiny-chat" if args.model_dir == Path(MODEL) else args.model_dir.name)
    args.gpu = has_nvidia_gpu()
    args.out.mkdir(parents=True, exist_ok=True)
    starters = {"vllm": lambda: start_vllm(args), "lorafleet": lambda: start_lorafleet(args, args.out / "state")}
    results, startup = {}, {}
    for system in args.systems:
        launched = time.monotonic()
        proc = starters[system]()
        try:
            wait_ready(f"http://127.0.0.1:{PORT}", args.name)
            startup[system] = time.monotonic() - launched
            print(f"{system}: first token {startup[system]:.0f} s after launch", flush=True)
            for c in args.concurrency:
                results[(system, c)] = load(system, c, args, args.out)
                print(f"{system} c={c}: {results[(system, c)]['output_throughput']:.0f} tok/s", flush=True)
        finally:
            stop(proc)
    report = table(results) + "\n\nstart → first token: " + ", ".join(f"{k} {v:.0f} s" for k, v in startup.items())
    print(report)
    (args.out / "table.md").write_text(report + "\n")
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "startup_s": startup}
    summary["runs"] = [{"system": k[0], "concurrency": k[1], **v} for k, v in results.items()]
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
