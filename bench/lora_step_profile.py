"""Where a LoRA decode step's time goes (issue 22's profile): vLLM's own engine, offline, one batch.

    python bench/lora_step_profile.py MODEL_DIR --out profile.json [--batch 64] [--configs base slots8 ...]

For each engine configuration (one fresh process each, so every engine starts alike) a batch of
`--batch` requests decodes together with `d` distinct adapters among them (request i uses adapter
i mod d; d = 0 is the base model). The time per decode step is
(time to generate LONG tokens - time to generate SHORT tokens) / (LONG - SHORT), so prefill and
scheduling of the first step cancel out. Every adapter is a copy of one peft adapter (vLLM treats
each name as its own adapter, and the kernels' cost does not depend on the values).

The configurations say which lever moves the step time:
  slots64       64 engine slots (what `max_loras: auto` picks for 64 registered adapters), CUDA graphs
  slots8        8 slots: the kernels' LoRA grid is max_loras + 1 wide whatever the batch holds
  specialize    64 slots with vLLM's specialize_active_lora (grid sized by the adapters in the batch)
  eager         64 slots without CUDA graphs
  targets       64 slots, LoRA only on the modules the adapters carry (lora_target_modules)
  all-linear    64 slots, adapters on every linear module (q k v o gate up down)
  rank64        64 slots, max_lora_rank 64 for rank-8 adapters (rank padding)
  tuned         as targets, with LoRA kernel configs from --kernel-configs (VLLM_TUNED_CONFIG_FOLDER;
                default: the ones lorafleet ships, bench/lora_kernel_tune.py)
  dual          as tuned, and LoRA on a second CUDA stream beside the base layer's GEMM
                (VLLM_LORA_ENABLE_DUAL_STREAM=1): whether the LoRA kernels hide behind the base
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QV = ("q_proj", "v_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHORT, LONG = 16, 144
TARGETS = ({"max_loras": 64, "lora_target_modules": list(QV)}, QV, [0, 1, 8, 32, 64])
CONFIGS = {  # name -> (engine keywords, adapter targets, distinct adapter counts to time)
    "slots64": ({"max_loras": 64}, QV, [0, 1, 8, 32, 64]),
    "slots8": ({"max_loras": 8}, QV, [0, 1, 8]),
    "specialize": ({"max_loras": 64, "specialize_active_lora": True}, QV, [0, 1, 8, 32, 64]),
    "eager": ({"max_loras": 64, "enforce_eager": True}, QV, [0, 1, 8, 64]),
    "targets": TARGETS,
    "all-linear": ({"max_loras": 64}, ALL_LINEAR, [0, 1, 64]),
    "rank64": ({"max_loras": 64, "max_lora_rank": 64}, QV, [1, 64]),
    "tuned": TARGETS,  # (the engine as "targets"; what differs is the environment, main())
    "dual": TARGETS,
}


def adapters(model_dir: Path, targets: tuple[str, ...], count: int, rank: int) -> list[Path]:
    """`count` copies of one random peft adapter (written once per target set)."""
    from bench.model_shapes import write_adapters

    root = Path(f"/tmp/lora-profile-{'-'.join(targets)}-r{rank}")
    if not (root / f"lora-{count - 1}").exists():
        first = write_adapters(model_dir, root, 1, rank, targets=targets)[0]
        for k in range(1, count):
            shutil.copytree(first, root / f"lora-{k}", dirs_exist_ok=True)
    return [root / f"lora-{k}" for k in range(count)]


def time_config(model_dir: Path, name: str, batch: int, rank: int) -> dict:
    """One engine of configuration `name`: seconds per decode step for each distinct-adapter count."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    engine_kwargs, targets, distinct = CONFIGS[name]
    paths = adapters(model_dir, targets, max(distinct), rank)
    llm = LLM(
        str(model_dir),
        load_format="dummy",
        enable_lora=True,
        max_lora_rank=engine_kwargs.pop("max_lora_rank", rank),
        max_cpu_loras=64,
        max_num_seqs=max(batch, 8),
        max_model_len=1024,
        enable_prefix_caching=False,
        **engine_kwargs,
    )
    vocab = llm.llm_engine.model_config.get_vocab_size()
    prompts = [
        TokensPrompt(prompt_token_ids=[(7 * i + 13 * j) % (vocab - 300) for j in range(64)]) for i in range(batch)
    ]
    lora = [LoRARequest(f"lora-{k}", k + 1, str(p)) for k, p in enumerate(paths)]

    def run(d: int, tokens: int) -> float:
        params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0)
        requests = [lora[i % d] for i in range(batch)] if d else None
        started = time.perf_counter()
        llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
        return time.perf_counter() - started

    steps = {}
    for d in distinct:
        run(d, SHORT)  # loads the adapters and warms the shapes
        short = min(run(d, SHORT) for _ in range(2))
        long = min(run(d, LONG) for _ in range(2))
        steps[d] = (long - short) / (LONG - SHORT)
        print(f"{name} d={d}: {steps[d] * 1e3:.2f} ms per step", flush=True)
    return {
        "config": name,
        "engine": CONFIGS[name][0],
        "targets": list(targets),
        "step_ms": {str(d): round(s * 1e3, 3) for d, s in steps.items()},
    }


def table(results: list[dict], batch: int) -> str:
    counts = sorted({int(d) for r in results for d in r["step_ms"]})
    rows = [
        f"Decode step time (ms) at batch {batch}, by distinct adapters in the batch (0 = base model)",
        "",
        "| config | " + " | ".join(str(d) for d in counts) + " |",
        "|---|" + "---|" * len(counts),
    ]
    for r in results:
        cells = [f"{r['step_ms'][str(d)]:.2f}" if str(d) in r["step_ms"] else "" for d in counts]
        rows.append(f"| {r['config']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--kernel-configs", type=Path, default=ROOT / "serve_app" / "assets" / "lora_kernels")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: time one config in this process
    args = parser.parse_args()
    if args.one:
        result = time_config(args.model_dir, args.one, args.batch, args.rank)
        args.out.write_text(json.dumps(result))
        return
    results = json.loads(args.out.read_text()) if args.out.exists() else []
    for name in args.configs:
        part = args.out.with_suffix(f".{name}.json")
        cmd = [sys.executable, __file__, str(args.model_dir), "--out", str(part), "--one", name]
        cmd += ["--batch", str(args.batch), "--rank", str(args.rank)]
        env = {k: v for k, v in os.environ.items() if k != "VLLM_TUNED_CONFIG_FOLDER"}
        if name in ("tuned", "dual"):
            env["VLLM_TUNED_CONFIG_FOLDER"] = str(args.kernel_configs)
        if name == "dual":
            env["VLLM_LORA_ENABLE_DUAL_STREAM"] = "1"
        if subprocess.run(cmd, env=env).returncode != 0:
            print(f"{name}: failed", flush=True)
            continue
        results = [r for r in results if r["config"] != name] + [json.loads(part.read_text())]
        args.out.write_text(json.dumps(results, indent=1))
    print(table(results, args.batch))


if __name__ == "__main__":
    main()
