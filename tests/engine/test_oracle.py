"""Greedy tokens of vLLM (CPU) equal those of transformers (+ peft): the correctness oracle."""

import uuid

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from serve_app import get_template
from serve_app.messages import AdapterRef, GenerationRequest, SamplingOptions
from serve_app.model_types import TINY_CHAT_DIR, XIAO_HUANG_DIR

pytestmark = pytest.mark.slow

PROMPTS = [
    ("你好!", []),
    ("浙江的省会在哪？", []),
    ("这有什么好吃的", [["浙江的省会在哪？", "浙江的省会是杭州。"]]),
    ("who are you?", []),
    ("What is your name?", []),
    ("Tell me a story.", []),
]
MAX_NEW = 40


def prompt_ids(tokenizer):
    template = get_template("qwen", tokenizer)
    return [template.encode(q, h)[0] for q, h in PROMPTS]


def vllm_greedy(engine, ids, adapter=None):
    async def one(prompt):
        request = GenerationRequest(
            uuid.uuid4().hex, tuple(prompt), SamplingOptions(max_tokens=MAX_NEW, temperature=0.0), adapter
        )
        tokens = []
        async for deltas in engine.engine.generate(request):
            tokens += [t for d in deltas for t in d.token_ids]
        return tokens

    async def all_():
        import asyncio

        return await asyncio.gather(*(one(p) for p in ids))

    return engine.run(all_())


def hf_greedy(model, ids, eos_ids):
    outputs = []
    for prompt in ids:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos_ids)
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs


@pytest.fixture(scope="module")
def hf_model():
    return AutoModelForCausalLM.from_pretrained(TINY_CHAT_DIR, dtype=torch.bfloat16).eval()


def eos_ids(engine):
    return [engine.hf_tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]


def test_base_model_tokens_equal_transformers(vllm_engine, hf_model):
    ids = prompt_ids(vllm_engine.hf_tokenizer)
    assert vllm_greedy(vllm_engine, ids) == hf_greedy(hf_model, ids, eos_ids(vllm_engine))


def test_adapter_tokens_equal_transformers_with_peft(vllm_engine, hf_model):
    # A trained adapter: its greedy choices have clear margins. (An untrained random adapter
    # leaves near-ties that bf16 kernels may break differently, which would test nothing.)
    ids = prompt_ids(vllm_engine.hf_tokenizer)
    peft_model = PeftModel.from_pretrained(hf_model, str(XIAO_HUANG_DIR)).eval()
    expected = hf_greedy(peft_model, ids, eos_ids(vllm_engine))
    peft_model.unload()
    got = vllm_greedy(vllm_engine, ids, AdapterRef("xiao-huang", 11, str(XIAO_HUANG_DIR)))
    assert got == expected
    assert got != vllm_greedy(vllm_engine, ids)  # the adapter changed the answers


def test_auto_slots_mix_that_many_adapters_in_one_batch(vllm_engine, hf_model):
    # max_loras: auto with no adapter registered gives the minimum, 4 slots; four adapter ids (the
    # same trained weights) and the base in one batch, every answer the peft oracle's.
    assert vllm_engine.engine.options.max_loras == 4 and vllm_engine.engine.options.max_cpu_loras >= 4
    ids = prompt_ids(vllm_engine.hf_tokenizer)[:2]
    peft_model = PeftModel.from_pretrained(hf_model, str(XIAO_HUANG_DIR)).eval()
    expected = hf_greedy(peft_model, ids, eos_ids(vllm_engine))
    peft_model.unload()
    refs = [AdapterRef(f"xh-{i}", 30 + i, str(XIAO_HUANG_DIR)) for i in range(4)]

    async def batch():
        import asyncio

        async def one(prompt, ref):
            request = GenerationRequest(
                uuid.uuid4().hex, tuple(prompt), SamplingOptions(max_tokens=MAX_NEW, temperature=0.0), ref
            )
            return [t async for deltas in vllm_engine.engine.generate(request) for d in deltas for t in d.token_ids]

        for ref in refs:
            await vllm_engine.engine.add_adapter(ref)
        answers = await asyncio.gather(*(one(p, ref) for ref in [*refs, None] for p in ids))
        return answers, await vllm_engine.engine.loaded_adapter_ids()

    answers, loaded = vllm_engine.run(batch())
    assert answers[: 4 * len(ids)] == expected * 4
    assert {r.adapter_id for r in refs} <= set(loaded)


def test_kernel_warmup_adapter_loads_and_generates_what_the_base_does(vllm_engine):
    # The warm-up of an H200's tuned LoRA kernels (serve_app/engines/lora_warmup.py) run through
    # here, at this engine's step limit: vLLM takes its zero adapter and leaves no adapter behind,
    # and that adapter's requests answer as the base model does.
    import json
    import shutil

    from serve_app.engines import lora_warmup
    from serve_app.platform import LORA_KERNEL_CONFIGS

    engine = vllm_engine.engine
    before = vllm_engine.run(engine.loaded_adapter_ids())
    lengths = engine.warmup_lengths(LORA_KERNEL_CONFIGS, "NVIDIA_H200")
    assert len(lengths) > 10 and max(lengths) < engine.max_model_len
    assert vllm_engine.run(engine.warm_lora_kernels(str(TINY_CHAT_DIR), LORA_KERNEL_CONFIGS, "NVIDIA_H200")) is not None
    assert vllm_engine.run(engine.loaded_adapter_ids()) == before
    config = json.loads((TINY_CHAT_DIR / "config.json").read_text())
    folder = lora_warmup.weightless_adapter(config, ["v_proj"], 8)
    weightless = AdapterRef("weightless", lora_warmup.WARMUP_ADAPTER_ID - 1, folder)
    try:
        ids = prompt_ids(vllm_engine.hf_tokenizer)[:3]
        assert vllm_greedy(vllm_engine, ids, weightless) == vllm_greedy(vllm_engine, ids)
    finally:
        vllm_engine.run(engine.remove_adapter(weightless.adapter_id))
        shutil.rmtree(folder, ignore_errors=True)
