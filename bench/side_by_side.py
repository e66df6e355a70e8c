"""Side-by-side serving benchmark: vLLM's own OpenAI server vs lorafleet, same model and engine args.

    .venv/bin/python bench/side_by_side.py [--concurrency 1 16 64] [--out bench/results]

Starts each server in turn on this machine, drives it with vLLM's load generator
(`vllm.benchmarks.serve`: streaming chat, random prompts, fixed lengths, ignore_eos, warm-ups), and
prints a markdown table of output tok/s, TTFT p50/p99 and TPOT p50 with ratios to vLLM measured in
the same run, and a PNG plot (throughput and TTFT against concurrency). JSON per run, table.md,
summary.json and the plot go to --out. The three systems: vLLM's server, Ray Serve LLM
(`ray.serve.llm.build_openai_app`) and lorafleet.

    --loras 16          also the multi-LoRA workload: 16 peft adapters, --max-loras resident, a random
                        adapter per request; plus new adapter -> first streamed token (p50 of 5)
    --lora-workloads 32 z256 64@32    more multi-LoRA workloads on the same server start: uniform over
                        the first 32 adapters, Zipf (s = 1) over 256, uniform over 64 at 32 streams
    --model-dir DIR --tp 4 --load-format dummy     a GPU run on a real shape (bench/model_shapes.py)
    --repeat 3          every system 3 times in turn; each row is the median run, all runs listed
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from serve_app.platform import has_nvidia_gpu, serve_env  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "serve_app" / "assets" / "tiny-chat")
PORT = 8400


def wait_ready(url: str, name: str, timeout: float = 900, headers: dict | None = None, proc=None) -> None:
    """Until a one-token chat completion answers (lorafleet's ingress is up before its engine).
    Gives up early if `proc` (the server's process) has exited."""
    body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server process exited with {proc.returncode}; see its log")
        try:
            if httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30).status_code == 200:
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
    if args.adapters:
        cmd += ["--enable-lora", "--max-loras", str(args.max_loras), "--max-lora-rank", str(args.lora_rank)]
        cmd += ["--max-cpu-loras", str(args.max_cpu_loras)] if args.max_cpu_loras else []
        cmd += ["--lora-modules", *(f"{n}={p}" for n, p in args.adapters.items())]
    cmd += shlex.split(args.vllm_flags)
    log = open(Path(args.out) / "vllm-server.log", "w")  # noqa: SIM115 (lives as long as the server)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}  # what lorafleet sets for its CPU engines
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # its (development-only) adapter API, for the latency row
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
    if args.adapters:
        engine |= {"max_loras": args.max_loras, "max_lora_rank": args.lora_rank, "max_cpu_loras": args.max_cpu_loras}
        model["lora_modules"] = {n: str(p) for n, p in args.adapters.items()}
    config = {
        "models": [model | {"engine": engine, "deployment": {"num_replicas": 1, "max_ongoing_requests": 256}}],
        "ingress": {  # the ingress defaults, with the replica count asked for
            "deployment": {
                "num_replicas": args.ingress_replicas,
                "max_ongoing_requests": 1024,
                "max_queued_requests": -1,
                "num_cpus": 0,
            }
        },
        "registry": {"state_dir": str(state), "allowed_roots": [str(args.out / "adapters")]},
    }
    code = (
        "import json,sys,time,ray; from ray import serve; from serve_app.app import build_app;"
        f"ray.init(num_cpus={max(8, os.cpu_count())}, include_dashboard=False);"
        f"serve.start(http_options={{'host':'127.0.0.1','port':{PORT}}});"
        f"serve.run(build_app(json.loads({json.dumps(json.dumps(config))})), name='bench', route_prefix='/');"
        "time.sleep(10**6)"
    )
    log = open(Path(args.out) / "lorafleet-server.log", "w")  # noqa: SIM115 (lives as long as the server)
    env = os.environ | serve_env() | dict(kv.split("=", 1) for kv in args.serve_env)
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT, env=env
    )


def start_lorafleet_deploy(args, state: Path) -> subprocess.Popen:
    """lorafleet as a user starts it: `lorafleet deploy` with its defaults (adapters given at start,
    residency sized by lorafleet); only the port, the state folder and what the model needs are set."""
    cmd = [sys.executable, "-m", "serve_app.cli", "deploy", "--port", str(PORT), "--state_dir", str(state)]
    cmd += ["--max_model_len", str(args.max_model_len)]
    if Path(args.model_dir) == Path(MODEL):
        cmd += ["--model_type", "tiny-chat"]
    else:
        cmd += ["--model_id_or_path", str(args.model_dir), "--served_model_name", args.name]
        cmd += ["--template_type", args.template, "--tensor_parallel_size", str(args.tp)]
    if args.load_format:
        cmd += ["--engine_kwargs", json.dumps({"load_format": args.load_format})]
    if args.adapters:
        cmd += ["--max_lora_rank", str(args.lora_rank), "--adapter_roots", str(args.out / "adapters")]
        cmd += ["--lora_modules", *(f"{n}={p}" for n, p in args.adapters.items())]
    cmd += args.deploy_flags  # a tuned variant: label its results as such
    log = open(Path(args.out) / "lorafleet-deploy-server.log", "w")  # noqa: SIM115 (lives as long as the server)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


def start_ray_serve_llm(args) -> subprocess.Popen:
    """Ray's own `ray.serve.llm.build_openai_app`, same engine arguments."""
    engine = {
        "tensor_parallel_size": args.tp,
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "enforce_eager": args.enforce_eager,
        "enable_prefix_caching": False,
        "seed": 0,
    }
    engine |= {"max_num_seqs": args.max_num_seqs} if args.max_num_seqs else {}
    engine |= {"load_format": args.load_format} if args.load_format else {}
    engine |= {"gpu_memory_utilization": args.gpu_memory_utilization} if args.gpu else {}
    llm_config = {
        "model_loading_config": {"model_id": args.name, "model_source": str(args.model_dir)},
        "engine_kwargs": engine,
        "deployment_config": {"num_replicas": 1, "max_ongoing_requests": 256},
        "runtime_env": {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
    }
    if not args.gpu:  # it asks for a GPU bundle unless told otherwise
        llm_config["accelerator_config"] = {"kind": "cpu"}
    code = (
        "import json,time,ray; from ray import serve; from ray.serve.llm import LLMConfig, build_openai_app;"
        # Ray Serve LLM waits forever for resources with fewer than 8 logical CPUs (ENVIRONMENT.md)
        f"ray.init(num_cpus={max(8, os.cpu_count())}, include_dashboard=False);"
        f"serve.start(http_options={{'host':'127.0.0.1','port':{PORT}}});"
        f"cfg=LLMConfig(**json.loads({json.dumps(json.dumps(llm_config))}));"
        "serve.run(build_openai_app({'llm_configs':[cfg]}), name='rayllm', route_prefix='/');"
        "time.sleep(10**6)"
    )
    log = open(Path(args.out) / "ray-serve-llm-server.log", "w")  # noqa: SIM115 (lives as long as the server)
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
    kill_leftovers()


def kill_leftovers() -> None:
    """vLLM's engine processes (and Serve's HAProxy) outlive a force-stopped Ray worker; left
    running they would take CPU from the next system's run."""
    import psutil

    for p in psutil.process_iter(["name"]):
        if (p.info["name"] or "").startswith(("VLLM::", "haproxy")):
            with contextlib.suppress(psutil.Error):
                p.kill()


def load(system: str, concurrency: int, args, out: Path, loras: list[str] = (), tag: str = "") -> dict:
    name = f"{system}-c{concurrency}{'-lora' if loras else ''}{tag}.json"
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
        "--random-range-ratio",
        str(args.length_spread),
        "--ignore-eos",
        "--num-prompts",
        str(max(concurrency * args.rounds, args.min_requests)),
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
    if loras:  # each request picks one of these at random
        cmd += ["--lora-modules", *loras]
    # /metrics is per ingress replica (HAProxy picks one per scrape): counts only add up with one
    before = lorafleet_counts() if system.startswith("lorafleet") and args.ingress_replicas == 1 else None
    with open(out / name.replace(".json", ".log"), "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    result = json.loads((out / name).read_text())
    if before:
        run = {k: v - before[k] for k, v in lorafleet_counts().items()}
        result["tokens_per_message"] = run["tokens"] / run["messages"] if run["messages"] else None
        result["ttft_parts_ms"] = ttft_parts(run)
    return result


_COUNTERS = {
    "lorafleet_completion_tokens_total": "tokens",
    "lorafleet_engine_messages_total": "messages",
    "lorafleet_time_to_first_token_seconds_sum": "ttft",
    "lorafleet_time_to_first_token_seconds_count": "requests",
    "lorafleet_render_seconds_sum": "render",
    "lorafleet_render_work_seconds_sum": "render_work",
    "lorafleet_ingress_loop_lag_seconds_sum": "lag",
    "lorafleet_ingress_loop_lag_seconds_count": "lag_samples",
    "lorafleet_engine_time_to_first_token_seconds_sum": "engine",
}


def lorafleet_counts() -> dict[str, float]:
    """lorafleet's counters so far (tokens, engine messages, TTFT and its parts), from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = dict.fromkeys(_COUNTERS.values(), 0.0)
    text = httpx.get(f"http://127.0.0.1:{PORT}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _COUNTERS:
                counts[_COUNTERS[sample.name]] += sample.value
    return counts


def ttft_parts(run: dict[str, float]) -> dict[str, float] | None:
    """Mean ms per request of the ingress's TTFT and its parts over one load run (warm-ups included)."""
    if not run["requests"]:
        return None
    parts = {k: 1000 * run[k] / run["requests"] for k in ("ttft", "render", "render_work", "engine")}
    parts["hops"] = parts["ttft"] - parts["render"] - parts["engine"]
    parts["loop_lag"] = 1000 * run["lag"] / run["lag_samples"] if run["lag_samples"] else 0.0
    return parts


@dataclass(frozen=True)
class Workload:
    """A multi-LoRA load: requests spread over the first `adapters` registered adapters, uniformly or
    by Zipf (s = `zipf`), at `streams` concurrent streams."""

    adapters: int
    zipf: float
    streams: int

    @property
    def label(self) -> str:
        spread = f"Zipf (s = {self.zipf})" if self.zipf else "uniform"
        return f"{spread} over {self.adapters} @ {self.streams} streams"

    @classmethod
    def parse(cls, spec: str, streams: int) -> Workload:
        """'64' (uniform over 64), 'z256' (Zipf s = 1 over 256), '64@32' (at 32 streams)."""
        count, _, at = spec.partition("@")
        zipf = 1.0 if count.startswith("z") else 0.0
        try:
            workload = cls(int(count.removeprefix("z")), zipf, int(at) if at else streams)
        except ValueError:
            workload = None
        if workload is None or workload.adapters < 1 or workload.streams < 1:
            raise argparse.ArgumentTypeError(f"--lora-workloads: {spec!r} is not N, zN or N@STREAMS (N, STREAMS >= 1)")
        return workload


def workloads(args) -> list[Workload]:
    """The main workload (--loras, --lora-zipf, --lora-concurrency) first, then --lora-workloads."""
    main = [Workload(args.loras, args.lora_zipf, args.lora_concurrency)] if args.loras else []
    return main + [Workload.parse(w, args.lora_concurrency) for w in args.lora_workloads]


def make_adapters(args) -> tuple[dict[str, Path], list[Path]]:
    """Random PEFT adapters for the model's shape, as many as the largest workload draws from, plus 5
    spare ones for the latency row."""
    count = max((w.adapters for w in workloads(args)), default=0)
    if not count:
        return {}, []
    from model_shapes import write_adapters

    paths = write_adapters(args.model_dir, args.out / "adapters", count + 5, args.lora_rank)
    return {f"lora-{i}": p for i, p in enumerate(paths[:count])}, paths[count:]


def new_adapter_latency(paths: list[Path]) -> list[float]:
    """Seconds from `POST /v1/load_lora_adapter` (vLLM's route; lorafleet speaks it too) to the first
    streamed token of a request for that adapter, once per fresh adapter."""
    url = f"http://127.0.0.1:{PORT}/v1"
    times = []
    # One client, made before the clock starts: building an httpx.Client (its TLS context) takes
    # 30-50 ms on the CPU machine, which a client per call added twice to every sample.
    with httpx.Client(timeout=120) as client:
        for p in paths:
            name = f"new-{p.name}-{time.monotonic_ns()}"
            started = time.perf_counter()
            r = client.post(f"{url}/load_lora_adapter", json={"lora_name": name, "lora_path": str(p)})
            r.raise_for_status()
            body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
            with client.stream("POST", f"{url}/chat/completions", json=body) as s:
                for line in s.iter_lines():
                    if line.startswith("data: ") and '"content"' in line:
                        times.append(time.perf_counter() - started)
                        break
    return times


def lora_draws(names: list[str], zipf: float) -> list[str]:
    """The adapter names the load generator draws from uniformly: each adapter once, or under Zipf
    (s = `zipf`) the adapter of rank i (from 1) about 1/i^s as often as the first one (repeated
    round(len / i^s) times, at least once), so a few adapters take most requests."""
    if not zipf:
        return names
    return [n for i, n in enumerate(names, 1) for _ in range(max(1, round(len(names) / i**zipf)))]


def lora_table(results: dict, lora_results: dict, one_adapter: dict, new_adapter_s: dict, args) -> str:
    c = args.lora_concurrency
    rows = [
        f"Multi-LoRA: {args.loras} adapters (rank {args.lora_rank}), {args.max_loras} resident, "
        + (f"Zipf (s = {args.lora_zipf}) adapter" if args.lora_zipf else "random adapter")
        + f" per request, concurrency {c}",
        "",
        "| system | base tok/s | one adapter tok/s | LoRA tok/s | LoRA / base | LoRA / one adapter "
        "| LoRA TTFT p50 ms | LoRA TPOT p50 ms | new adapter → first token p50 s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for system, r in lora_results.items():
        base = results.get((system, c), {}).get("output_throughput", float("nan"))
        one = one_adapter.get(system, {}).get("output_throughput", float("nan"))
        latency = statistics.median(new_adapter_s[system]) if new_adapter_s.get(system) else float("nan")
        spread = r["output_throughput"]
        rows.append(
            f"| {system} | {base:.0f} | {one:.0f} | {spread:.0f} | {spread / base:.2f}x | {spread / one:.2f}x "
            f"| {r['p50_ttft_ms']:.1f} | {r['p50_tpot_ms']:.2f} | {latency:.3f} |"
        )
    return "\n".join(rows)


def matrix_table(results: dict, matrix: dict, args) -> str:
    """Every multi-LoRA workload of every system's start, beside the base run at the same streams."""
    rows = [
        f"Multi-LoRA workloads, rank {args.lora_rank}, one start per system",
        "",
        "| workload | system | base tok/s | one adapter tok/s | LoRA tok/s | LoRA / base | LoRA / one adapter "
        "| LoRA TTFT p50 ms | LoRA TPOT p50 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    nan = {"output_throughput": float("nan")}
    for system, runs in matrix.items():
        for label, r in runs.items():
            if label.startswith("one adapter"):
                continue
            c = r["max_concurrency"]
            base = results.get((system, c), nan)["output_throughput"]
            one = runs.get(f"one adapter @ {c} streams", nan)["output_throughput"]
            spread = r["output_throughput"]
            rows.append(
                f"| {label} | {system} | {base:.0f} | {one:.0f} | {spread:.0f} | {spread / base:.2f}x "
                f"| {spread / one:.2f}x | {r['p50_ttft_ms']:.1f} | {r['p50_tpot_ms']:.2f} |"
            )
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    """Output tok/s and TTFT p50 against concurrency, one line per system."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (tput, ttft) = plt.subplots(1, 2, figsize=(10, 4))
    for system in dict.fromkeys(k[0] for k in results):
        cs = sorted(c for s, c in results if s == system)
        tput.plot(cs, [results[(system, c)]["output_throughput"] for c in cs], marker="o", label=system)
        ttft.plot(cs, [results[(system, c)]["p50_ttft_ms"] for c in cs], marker="o", label=system)
    for ax, label in ((tput, "output tok/s"), (ttft, "TTFT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def per_message(result: dict) -> str:
    """Tokens per engine message (lorafleet's coalescing); '-' where the system has no such hop."""
    value = result.get("tokens_per_message")
    return f"{value:.2f}" if value else "-"


def ttft_table(results: dict) -> str:
    """lorafleet's time to first token split by its /metrics: where the time goes at each concurrency."""
    rows = [
        "lorafleet time to first token, where it goes (means per request from its /metrics, ms; the ingress's "
        "clock, so HTTP and HAProxy are not in it)",
        "",
        "| system | concurrency | TTFT at the ingress | render call | of it, the renderer's work | engine replica (queue, "
        "prefill) | hops and the rest | ingress event-loop lag (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (system, c), r in sorted(results.items(), key=lambda kv: kv[0][1]):
        if system.startswith("lorafleet") and (p := r.get("ttft_parts_ms")):
            cells = [p["ttft"], p["render"], p.get("render_work", 0), p["engine"], p["hops"], p.get("loop_lag", 0)]
            rows.append(f"| {system} | {c} | " + " | ".join(f"{v:.1f}" for v in cells) + " |")
    return "\n".join(rows) if len(rows) > 4 else ""


def table(results: dict) -> str:
    rows = [
        "| system | concurrency | output tok/s | ratio to vLLM | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | tokens/message |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (system, c), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0] != "vllm")):
        ratio = (
            f"{r['output_throughput'] / results[('vllm', c)]['output_throughput']:.2f}x"
            if ("vllm", c) in results
            else "-"  # no vLLM row at this concurrency to compare with
        )
        each = r.get("throughputs", [])
        spread = f" ({', '.join(f'{t:.0f}' for t in each)})" if len(each) > 1 else ""
        rows.append(
            f"| {system} | {c} | {r['output_throughput']:.0f}{spread} | {ratio} | {r['p50_ttft_ms']:.1f} "
            f"| {r['p99_ttft_ms']:.1f} | {r['p50_tpot_ms']:.2f} | {per_message(r)} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument(
        "--length-spread",
        type=float,
        default=0.0,
        help="prompt and output lengths drawn from [len * (1 - x), len * (1 + x)] (0: all the same length)",
    )
    parser.add_argument("--rounds", type=int, default=4, help="requests per concurrency slot")
    parser.add_argument(
        "--min-requests", type=int, default=16, help="at least this many per concurrency (a p99 of 16 is their max)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="run every system N times in turn; rows are medians, each run listed"
    )
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
        "--serve-env",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="environment of lorafleet's Ray cluster, on top of serve_app.platform.serve_env()",
    )
    parser.add_argument(
        "--systems",
        nargs="+",
        default=["vllm", "ray-serve-llm", "lorafleet"],
        choices=["vllm", "ray-serve-llm", "lorafleet", "lorafleet-deploy"],
        help="lorafleet: launched by this script with tuned deployment options; lorafleet-deploy: "
        "`lorafleet deploy` with its defaults, as users start it",
    )
    parser.add_argument("--loras", type=int, default=0, help="multi-LoRA workload with this many adapters (peft)")
    parser.add_argument("--max-loras", type=int, default=4, help="adapters resident per replica (both servers)")
    parser.add_argument("--max-cpu-loras", type=int, help="adapters kept in host memory (both servers)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-zipf", type=float, default=0, help="Zipf exponent of adapter popularity (0: uniform)")
    parser.add_argument("--ingress-replicas", type=int, default=1, help="lorafleet's ingress replicas")
    parser.add_argument(
        "--deploy-flags",
        nargs=argparse.REMAINDER,
        default=[],
        help="last: flags added to lorafleet-deploy's command (a tuned variant), e.g. --deploy-flags --max_loras 8",
    )
    parser.add_argument(
        "--vllm-flags",
        default="",
        help="flags added to vLLM's server command (a tuned variant), as one string: "
        "--vllm-flags='--lora-target-modules q_proj v_proj'",
    )
    parser.add_argument("--lora-concurrency", type=int, default=16)
    parser.add_argument(
        "--lora-workloads",
        nargs="*",
        default=[],
        help="more multi-LoRA workloads on the same start: N (uniform over the first N adapters), zN (Zipf s = 1), "
        "N@STREAMS; the adapters registered are the most any workload draws from",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--keep", action="store_true", help="keep other systems' results in --out (one comparison over several calls)"
    )
    args = parser.parse_args()
    try:
        workloads(args)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    args.name = args.name or ("tiny-chat" if args.model_dir == Path(MODEL) else args.model_dir.name)
    args.gpu = has_nvidia_gpu()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    starters = {
        "vllm": lambda: start_vllm(args),
        "ray-serve-llm": lambda: start_ray_serve_llm(args),
        "lorafleet": lambda: start_lorafleet(args, args.out / "state"),
        "lorafleet-deploy": lambda: start_lorafleet_deploy(args, args.out / "state-deploy"),
    }
    found = earlier_results(args) if args.keep else Findings()
    args.adapters, args.spare_adapters = make_adapters(args)
    kill_leftovers()
    for k in range(args.repeat):
        tag = f"-r{k + 1}" if args.repeat > 1 else ""
        for system in args.systems:
            run_system(system, starters[system], args, tag, found)


@dataclass
class Findings:
    """What one comparison measured (with --keep, also the other systems of earlier calls)."""

    results: dict = field(default_factory=dict)  # (system, concurrency) -> the median run
    runs: dict = field(default_factory=dict)  # (system, concurrency) -> every run of this call
    startup: dict = field(default_factory=dict)  # system -> seconds from launch to first token
    lora_results: dict = field(default_factory=dict)  # system -> the multi-LoRA run
    one_adapter: dict = field(default_factory=dict)  # system -> the same streams, all on one adapter
    new_adapter_s: dict = field(default_factory=dict)  # system -> new adapter -> first token, seconds
    lora_matrix: dict = field(default_factory=dict)  # system -> workload label -> its run


def run_system(system, starter, args, tag: str, found: Findings) -> None:
    """Start one system, load it at every concurrency, stop it; a row is the median of its runs so far."""
    import socket

    deadline = time.monotonic() + 60  # the previous system's server may still be letting go of it
    while True:  # a server left by an interrupted run would answer in this one's place
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", PORT)) != 0:
                break
        if time.monotonic() > deadline:
            raise SystemExit(f"port {PORT} is taken (a server of an interrupted run?); stop it first")
        time.sleep(1)
    launched = time.monotonic()
    proc = starter()
    try:
        wait_ready(f"http://127.0.0.1:{PORT}", args.name)
        found.startup[system] = time.monotonic() - launched
        print(f"{system}: first token {found.startup[system]:.0f} s after launch", flush=True)
        for c in args.concurrency:
            run = load(system, c, args, args.out, tag=tag)
            found.runs.setdefault((system, c), []).append(run)
            found.results[(system, c)] = median_run(found.runs[(system, c)])
            print(f"{system} c={c}{tag}: {run['output_throughput']:.0f} tok/s", flush=True)
        if args.adapters and system != "ray-serve-llm":  # it loads adapters from cloud storage only
            run_workloads(system, args, tag, found)
            found.new_adapter_s[system] = new_adapter_latency(args.spare_adapters)
            print(f"{system}: new adapter -> first token p50 {statistics.median(found.new_adapter_s[system]):.3f} s")
            write_report(args, found)  # before the stop, which can take lorafleet half a minute
    finally:
        stop(proc)
    write_report(args, found)  # each system's part lands as it ends


def run_workloads(system: str, args, tag: str, found: Findings) -> None:
    """Every multi-LoRA workload on the running server, and per stream count the same streams on one
    adapter (what spreading them over adapters costs: issue 22's CPU measure). The first workload
    is the main one (lora_results, one_adapter); all of them land in lora_matrix."""
    names = list(args.adapters)
    matrix = found.lora_matrix.setdefault(system, {})
    for k, w in enumerate(workloads(args)):
        draws = lora_draws(names[: w.adapters], w.zipf)
        run = load(system, w.streams, args, args.out, loras=draws, tag=f"{tag}-w{k}")
        label = w.label + (f" [{tag.lstrip('-')}]" if tag else "")  # (a --repeat's run)
        while label in matrix:  # a workload given twice (first and last: does the start's first run pay more?)
            label += ", again"
        matrix[label] = run
        one_label = f"one adapter @ {w.streams} streams"
        if one_label not in matrix:
            matrix[one_label] = load(system, w.streams, args, args.out, loras=names[:1], tag=f"{tag}-one{w.streams}")
        if k == 0:
            found.lora_results[system], found.one_adapter[system] = run, matrix[one_label]
        print(
            f"{system} {label}: {run['output_throughput']:.0f} tok/s,"
            f" one adapter: {matrix[one_label]['output_throughput']:.0f} tok/s",
            flush=True,
        )
        write_report(args, found)  # what ran so far survives a call cut short (a lease's time limit)


def median_run(runs: list[dict]) -> dict:
    """The run with the median output throughput (the lower one of an even count), every run's
    throughput beside it: one run decides nothing on a machine whose speed swings ±20%."""
    ordered = sorted(runs, key=lambda r: r["output_throughput"])
    return ordered[(len(ordered) - 1) // 2] | {"throughputs": [r["output_throughput"] for r in runs]}


def write_report(args, found: Findings) -> None:
    results, startup, lora_results, one_adapter, new_adapter_s = (
        found.results,
        found.startup,
        found.lora_results,
        found.one_adapter,
        found.new_adapter_s,
    )
    report = table(results) + "\n\nstart → first token: " + ", ".join(f"{k} {v:.0f} s" for k, v in startup.items())
    if parts := ttft_table(results):
        report += "\n\n" + parts
    if lora_results:
        report += "\n\n" + lora_table(results, lora_results, one_adapter, new_adapter_s, args)
    if args.lora_workloads:
        report += "\n\n" + matrix_table(results, found.lora_matrix, args)
    print(report, flush=True)
    (args.out / "table.md").write_text(report + "\n")
    plot(results, args.out / "side_by_side.png")
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "startup_s": startup}
    summary["runs"] = [{"system": k[0], "concurrency": k[1], **v} for k, v in results.items()]
    summary["lora_runs"] = lora_results
    summary["one_adapter_runs"] = one_adapter
    summary["new_adapter_to_first_token_s"] = new_adapter_s
    summary["lora_matrix"] = found.lora_matrix
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))


def earlier_results(args) -> Findings:
    """What --out/summary.json holds for the systems this call does not run (a run split over calls)."""
    path = args.out / "summary.json"
    if not path.exists():
        return Findings()
    summary = json.loads(path.read_text())
    other = [s for s in summary.get("startup_s", {}) if s not in args.systems]
    results = {(r["system"], r["concurrency"]): r for r in summary.get("runs", []) if r["system"] in other}

    def pick(key: str) -> dict:
        return {k: v for k, v in summary.get(key, {}).items() if k in other}

    return Findings(
        results,
        {},
        pick("startup_s"),
        pick("lora_runs"),
        pick("one_adapter_runs"),
        pick("new_adapter_to_first_token_s"),
        pick("lora_matrix"),
    )


if __name__ == "__main__":
    main()
