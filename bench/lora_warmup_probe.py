"""What a fresh machine's first LoRA requests pay for compiling vLLM's LoRA kernels with lorafleet's
tuned configs, and whether the start-time warm-up (serve_app/engines/lora_warmup.py) removes it.
A probe on the GPU, not product code:

    python bench/lora_warmup_probe.py MODEL_DIR [--out probe.json] [--load-format dummy]

Two engines in turn as an engine replica builds them (tuned configs, LoRA on q/v, 64 slots, vLLM's
server defaults), each with an empty Triton cache (a new container's) and vLLM's JIT monitor
logging every kernel compiled after its start ("Triton kernel JIT compilation during inference"):
1. without the warm-up (`AsyncLLM` built directly);
2. through `VllmEngine.start`, with it.
Each then serves the same traffic with a LoRA adapter: prefills of several lengths one at a time,
then a burst of 16 at once, timing each request's first token. The log's phase lines bracket the
monitor's lines, so the compiles of each phase can be counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ENGINES = ("without_warmup", "with_warmup")
LENGTHS = [300, 700, 1500, 1501, 3000, 6000, 6001]  # buckets 256, 512, 2048 (both kinds), 8192 (both)


def options(load_format: str, max_model_len: int):
    from serve_app.config import EngineOptions

    return EngineOptions(
        enable_lora=True,
        max_loras=64,
        max_cpu_loras=64,
        max_lora_rank=8,
        lora_target_modules=["q_proj", "v_proj"],
        max_model_len=max_model_len,
        engine_kwargs={"load_format": load_format, "jit_monitor_verbose": True},
    )


async def engine_without_warmup(model_dir: str, opts):
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    from serve_app.engines.vllm_engine import VllmEngine, engine_args
    from serve_app.platform import prepare_vllm_env, use_tuned_lora_kernels

    prepare_vllm_env(1)
    if not use_tuned_lora_kernels(model_dir):
        raise SystemExit("no tuned LoRA kernel configs for this GPU: nothing to probe")
    llm = AsyncLLM.from_engine_args(engine_args(model_dir, opts), usage_context=UsageContext.OPENAI_API_SERVER)
    return VllmEngine(opts, llm)


async def traffic(engine, model_dir: str, seed: int) -> dict:
    """First-token seconds of LoRA prefills: LENGTHS one at a time, then 16 of random lengths at once."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from serve_app.engines import lora_slots, lora_warmup
    from serve_app.messages import AdapterRef

    folder = lora_warmup.weightless_adapter(lora_slots.hf_config(model_dir, False), ["q_proj", "v_proj"], 8)
    adapter = AdapterRef("user", 1, folder)
    await engine.add_adapter(adapter)
    params = SamplingParams(max_tokens=1, ignore_eos=True)

    async def first_token_s(index: int, length: int) -> float:
        t0 = time.perf_counter()
        prompt = TokensPrompt(prompt_token_ids=lora_warmup.warmup_prompt(seed + index, length))
        lora = engine._lora_request(adapter)
        async for _ in engine.llm.generate(prompt, params, f"probe-{seed + index}", lora_request=lora):
            pass
        return round(time.perf_counter() - t0, 3)

    one_at_a_time = {str(n): await first_token_s(i, n) for i, n in enumerate(LENGTHS)}
    rng = random.Random(seed)
    burst = [rng.randint(100, min(1200, engine.max_model_len - 2)) for _ in range(16)]
    t0 = time.perf_counter()
    burst_s = await asyncio.gather(*(first_token_s(100 + i, n) for i, n in enumerate(burst)))
    await engine.remove_adapter(adapter.adapter_id)
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "one_at_a_time_s": one_at_a_time,
        "burst_lengths": burst,
        "burst_first_token_s": sorted(burst_s),
        "burst_wall_s": round(time.perf_counter() - t0, 3),
    }


def phase(name: str) -> None:
    print(f"=== phase: {name} ===", flush=True)


async def probe(model_dir: str, load_format: str, max_model_len: int, engines: list[str]) -> dict:
    from serve_app.engines.vllm_engine import VllmEngine
    from serve_app.platform import gpu_names

    opts = options(load_format, max_model_len)
    report = {"gpu": gpu_names()[0]}
    for name in engines:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cold-")  # a new container's
        phase(f"{name}: start")
        started = time.perf_counter()
        if name == "with_warmup":
            engine = await VllmEngine.start(model_dir, opts)
        else:
            engine = await engine_without_warmup(model_dir, opts)
        start_s = round(time.perf_counter() - started, 1)
        phase(f"{name}: traffic")
        report[name] = {"engine_start_s": start_s, **await traffic(engine, model_dir, seed=1000)}
        phase(f"{name}: done")
        engine.shutdown()
        del engine
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--out", default="lora_warmup_probe.json")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--max-model-len", type=int, default=8200, help="room for the 8,192-token bucket")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    args = parser.parse_args()
    report = asyncio.run(probe(args.model_dir, args.load_format, args.max_model_len, args.engines))
    print(json.dumps(report, indent=1))
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
