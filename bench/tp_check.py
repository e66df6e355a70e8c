"""Tensor-parallel check through `serve run` of the GPU example config.

    python bench/tp_check.py --model-dir /tmp/qwen7b --tp 4 2 1                  # TP equality (float32)
    python bench/tp_check.py --model-dir /tmp/qwen7b --tp 4 --dtype float16 --adapters /tmp/qwen7b-adapters/lora-{0,1}
    python bench/tp_check.py --model-dir /tmp/qwen7b --tp 1 --replicas 2 --dtype float16 --adapters ...  # affinity

For each tensor_parallel_size in --tp: writes serve_config.gpu.yaml with the model, TP size and
replica count swapped in, runs `serve run` on it, then through the openai client (with the config's
api_key) asks greedy chat completions for a handful of prompts, registers the adapters through the
admin API (LoRA registry), asks each adapter once (it loads), waits for the replicas to report it,
then asks with each adapter `--repeats` times (2 by default), and saves the app's /metrics counts of which engine
replica took which model's requests. Then it compares: greedy output at every TP size equals the
last one (or --reference, a saved run); each adapter's output differs from the base and from the
other adapters and repeats exactly. Where outputs part, it shows whether the two tokens were a near
tie (top-5 logprobs). Prints a report and writes it as JSON to --results; exits 1 if a check fails.

Equality needs float32: random weights give near-flat logits whose top two collide at bf16's
resolution, and TP changes the reduction order. vLLM's LoRA kernels take only fp16/bf16, so the
adapter checks run in float16 (8x finer than bf16; prefix caching off, so a repeat recomputes alike).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml
from side_by_side import kill_leftovers, wait_ready  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "change-me"  # serve_config.gpu.yaml's
ADMIN_KEY = "admin-change-me"
PROMPTS = [
    "Tell me about the sea.",
    "hello world abcdef ghij",
    "What is the capital of France?",
    "one two three four five six",
    "Write a short poem about tensor parallelism.",
]


def write_config(args, tp: int, out: Path) -> Path:
    """serve_config.gpu.yaml with this model and TP size; every other setting as the example has it."""
    config = yaml.safe_load((ROOT / "serve_config.gpu.yaml").read_text())
    config["http_options"]["port"] = args.port
    app_args = config["applications"][0]["args"]
    model = app_args["models"][0]
    model.pop("model_type", None)
    model.update(name="shape", model_id_or_path=str(args.model_dir), template_type=args.template, lora_modules={})
    model["engine"].update(
        tensor_parallel_size=tp,
        dtype=args.dtype,
        enforce_eager=args.eager,
        max_model_len=args.max_model_len,
        enable_lora=bool(args.adapters),  # vLLM's GPU LoRA kernels refuse float32, even while profiling
        seed=0,
        engine_kwargs={"enable_prefix_caching": False, **args.engine_kwargs},  # a repeat must recompute
    )
    if args.cpu:  # the CPU has no GPU memory share to set
        model["engine"].pop("gpu_memory_utilization", None)
    model["deployment"] = {"num_replicas": args.replicas, "max_ongoing_requests": 64}
    app_args["ingress"]["admin_api_key"] = ADMIN_KEY
    app_args["ingress"]["deployment"] = {"num_replicas": 1, "num_cpus": 0}
    shutil.rmtree(out / f"state-tp{tp}", ignore_errors=True)  # a fresh registry for each run
    app_args["registry"] = {
        "state_dir": str(out / f"state-tp{tp}"),
        "allowed_roots": sorted({str(Path(a).parent) for a in args.adapters}),
    }
    path = out / f"serve_config.tp{tp}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_app(args, tp: int, out: Path) -> dict:
    config = write_config(args, tp, out)
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    env = {**os.environ, "RAY_ADDRESS": "auto"}
    subprocess.run([*ray, "stop", "--force"], capture_output=True)
    subprocess.run(
        [
            *ray,
            "start",
            "--head",
            "--num-cpus",
            str(args.num_cpus),
            "--disable-usage-stats",
            "--include-dashboard=false",
        ],
        check=True,
        capture_output=True,
    )
    log = open(out / f"serve-tp{tp}.log", "w")  # noqa: SIM115 (lives as long as the app)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray.serve.scripts", "run", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=ROOT,
        env=env,
    )
    try:
        base_url = f"http://127.0.0.1:{args.port}"
        wait_ready(base_url, "shape", headers={"Authorization": f"Bearer {API_KEY}"}, proc=proc)
        print(f"TP={tp}: app up in {time.monotonic() - started:.0f} s", flush=True)
        answers = ask_all(args, base_url)
        return {"tp": tp, "replicas": args.replicas, "startup_s": time.monotonic() - started, **answers}
    except Exception:
        log.flush()
        print("".join((out / f"serve-tp{tp}.log").read_text().splitlines(keepends=True)[-60:]), flush=True)
        raise
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run([*ray, "stop", "--force"], capture_output=True)
        kill_leftovers()


def ask_all(args, base_url: str) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=300)
    base = {p: ask(client, "shape", p, args.max_tokens) for p in PROMPTS}
    adapters = {}
    for k, path in enumerate(args.adapters):
        name = f"lora-{k}"
        r = httpx.post(
            f"{base_url}/v1/adapters",
            json={"name": name, "path": str(path)},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=120,
        )
        if r.status_code != 201:
            raise RuntimeError(f"registering {path}: {r.status_code} {r.text}")
        ask(client, name, PROMPTS[0], 1)  # loads it on one replica
        time.sleep(2)  # the replica reports it; Serve's router learns where it is
        adapters[name] = [
            {p: ask(client, name, p, args.max_tokens) for p in PROMPTS[: args.adapter_prompts]}
            for _ in range(args.repeats)
        ]
    models = sorted(m.id for m in client.models.list().data)
    return {"models": models, "base": base, "adapters": adapters, "engine_requests": engine_requests(base_url)}


def engine_requests(base_url: str) -> list[dict]:
    """The app's own count of requests per model, engine replica and adapter residency (/metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).text
    return [
        {**sample.labels, "requests": sample.value}
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "lorafleet_engine_requests_total"
    ]


def ask(client, model: str, prompt: str, max_tokens: int) -> dict:
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=max_tokens,
        seed=0,
        logprobs=True,
        top_logprobs=5,
    )
    content = r.choices[0].logprobs.content or []
    return {
        "text": r.choices[0].message.content,
        "tokens": [t.token for t in content],
        "top": [{c.token: round(c.logprob, 4) for c in t.top_logprobs} for t in content],
    }


def first_difference(a: dict, b: dict) -> dict | None:
    """Where two greedy answers part, and whether it was a near tie between their two tokens."""
    for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])):
        if x != y:
            return {
                "position": i,
                "tokens": [x, y],
                "near_tie": y in a["top"][i] and x in b["top"][i],
                "top": [a["top"][i], b["top"][i]],
            }
    if len(a["tokens"]) != len(b["tokens"]):
        return {"position": min(len(a["tokens"]), len(b["tokens"])), "tokens": "length differs"}
    return None


def compare(runs: list[dict]) -> tuple[list[str], bool]:
    lines, ok = [], True
    ref = runs[-1]
    for run in runs:
        for row in run["engine_requests"]:
            lines.append(
                f"TP={run['tp']} x{run['replicas']} /metrics: {row['model']} -> replica {row['replica']} "
                f"({row['adapter']}): {row['requests']:.0f}"
            )
        for name in run["adapters"]:  # affinity: loaded once, then every request on that replica
            rows = [r for r in run["engine_requests"] if r["model"] == name]
            loads = sum(r["requests"] for r in rows if r["adapter"] == "loaded")
            held_by = {r["replica"] for r in rows}
            ok &= loads == 1 and len(held_by) == 1
            lines.append(f"TP={run['tp']} x{run['replicas']} {name}: loaded {loads:.0f}x, served by {sorted(held_by)}")
        for p in PROMPTS:
            diff = first_difference(run["base"][p], ref["base"][p])
            if run is not ref:
                same = diff is None
                ok &= same
                lines.append(f"TP={run['tp']} vs TP={ref['tp']} base {p!r}: {'equal' if same else diff}")
        for name, (first, *again) in run["adapters"].items():
            for p, answer in first.items():
                stable = all(answer["tokens"] == later[p]["tokens"] for later in again)
                differs = answer["tokens"] != run["base"][p]["tokens"]
                others = [a for n, a in run["adapters"].items() if n != name]
                distinct = all(answer["tokens"] != o[0][p]["tokens"] for o in others)
                same_as_ref = run is ref or answer["tokens"] == ref["adapters"].get(name, [{}])[0].get(p, {}).get(
                    "tokens"
                )
                ok &= stable and differs and distinct
                lines.append(
                    f"TP={run['tp']} {name} {p!r}: stable={stable} differs_from_base={differs} "
                    f"differs_from_other_adapters={distinct} equal_to_TP={ref['tp']}={same_as_ref}"
                )
    return lines, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--template", default="qwen")
    parser.add_argument("--tp", type=int, nargs="+", default=[4, 1], help="sizes to run; the last is the reference")
    parser.add_argument("--adapters", nargs="*", default=[])
    parser.add_argument("--replicas", type=int, default=1, help="LLMServer replicas (each holds TP GPUs)")
    parser.add_argument("--reference", type=Path, help="a saved run-tpN.json to compare against (after --tp's)")
    parser.add_argument("--adapter-prompts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="asks per adapter and prompt (stable = all equal)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument(
        "--dtype",
        default="float32",
        help="float32: random weights give near-flat logits that collide at bf16's resolution",
    )
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--engine-kwargs", type=json.loads, default={}, help='JSON, e.g. {"load_format": "dummy"}')
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--cpu", action="store_true", help="running on the CPU (local rehearsal)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tp_check", help="work dir")
    parser.add_argument("--results", type=Path, help="where the run and report JSON go (default: --out)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.results or args.out
    results.mkdir(parents=True, exist_ok=True)
    label = f"{args.dtype}" + (f"-x{args.replicas}" if args.replicas > 1 else "")
    runs = []
    for tp in args.tp:  # each run is saved as it ends, so a cut-off lease keeps what finished
        runs.append(run_app(args, tp, args.out))
        (results / f"run-tp{tp}-{label}.json").write_text(json.dumps(runs[-1], indent=1))
    if args.reference:
        runs.append(json.loads(args.reference.read_text()))
    lines, ok = compare(runs)
    print("\n".join(lines))
    print("ALL CHECKS HOLD" if ok else "SOME CHECKS FAILED")
    report = {"ok": ok, "report": lines, "runs": runs}
    (results / f"tp_check-{'-'.join(map(str, args.tp))}-{label}.json").write_text(json.dumps(report, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
