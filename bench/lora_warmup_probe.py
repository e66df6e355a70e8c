"""What a fresh machine's first LoRA requests pay for compiling vLLM's LoRA kernels with lorafleet's
tuned configs, and what the start-time warm-up (serve_app/engines/lora_warmup.py) costs instead.
A probe on the GPU, not product code:

    python bench/lora_warmup_probe.py MODEL_DIR [--out probe.json] [--load-format dummy]

One engine as an engine replica builds it (tuned configs, LoRA on q/v, 64 slots), but without the
warm-up, and an empty Triton cache (a new container's). Then, one request at a time, each alone:
1. two LoRA prefills of 1,500 and 1,501 tokens (a 2,048-token bucket nobody compiled at start):
   the first pays the compiles, the second is the warm cost;
2. the warm-up's prompts, twice: the first pass compiles the buckets still cold, the second is what
   the prefills themselves cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


async def probe(model_dir: str, load_format: str, max_model_len: int) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    from serve_app.config import EngineOptions
    from serve_app.engines import lora_slots, lora_warmup
    from serve_app.engines.vllm_engine import VllmEngine, engine_args
    from serve_app.messages import AdapterRef
    from serve_app.platform import gpu_names, prepare_vllm_env, use_tuned_lora_kernels

    options = EngineOptions(
        enable_lora=True,
        max_loras=64,
        max_cpu_loras=64,
        max_lora_rank=8,
        lora_target_modules=["q_proj", "v_proj"],
        max_model_len=max_model_len,
        engine_kwargs={"load_format": load_format},
    )
    prepare_vllm_env(1)
    folder = use_tuned_lora_kernels(model_dir)
    if not folder:
        raise SystemExit("no tuned LoRA kernel configs for this GPU: nothing to probe")
    started = time.perf_counter()
    engine = VllmEngine(options, AsyncLLM.from_engine_args(engine_args(model_dir, options)))
    report = {"gpu": gpu_names()[0], "engine_start_s": round(time.perf_counter() - started, 1)}
    config = lora_slots.hf_config(model_dir, False)
    adapter_dir = lora_warmup.weightless_adapter(config, options.lora_target_modules, 8)
    user_adapter = AdapterRef("user", 1, adapter_dir)
    await engine.add_adapter(user_adapter)

    async def first_token_s(index: int, length: int) -> float:
        t0 = time.perf_counter()
        prompt = TokensPrompt(prompt_token_ids=lora_warmup.warmup_prompt(index, length))
        params = SamplingParams(max_tokens=1, ignore_eos=True)
        async for _ in engine.llm.generate(
            prompt, params, f"probe-{index}", lora_request=engine._lora_request(user_adapter)
        ):
            pass
        return round(time.perf_counter() - t0, 3)

    probe_len = min(1500, engine.max_model_len - 2)  # 1500 on a GPU: bucket 2048, compiled by no start
    report["lora_prefill_first_s"] = await first_token_s(1000, probe_len)
    report["lora_prefill_second_s"] = await first_token_s(1001, probe_len + 1)
    lengths = lora_warmup.token_counts(folder, gpu_names()[0], engine.max_model_len - 1)
    report["warmup_lengths"] = lengths
    report["warmup_first_pass_s"] = round(await engine.warm_lora_kernels(lengths, model_dir), 2)
    report["warmup_second_pass_s"] = round(await engine.warm_lora_kernels(lengths, model_dir), 2)
    engine.shutdown()
    shutil.rmtree(adapter_dir, ignore_errors=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--out", default="lora_warmup_probe.json")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--max-model-len", type=int, default=8200, help="room for the 8,192-token bucket")
    args = parser.parse_args()
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cold-")  # a new container's
    report = asyncio.run(probe(args.model_dir, args.load_format, args.max_model_len))
    print(json.dumps(report, indent=1))
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
