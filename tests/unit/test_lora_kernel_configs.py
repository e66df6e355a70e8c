"""lorafleet's tuned LoRA kernel configs (serve_app/assets/lora_kernels): read through vLLM's own
lookup, and given to an engine only on a GPU model they were tuned for.

The kernels run only on a GPU; the GPU runs (docs/benchmarks.md) measure them. Here the files are
checked against the installed vLLM's real `get_lora_op_configs`: a lookup that finds no entry
raises a KeyError inside the engine, at its first LoRA batch of that shape."""

import itertools
import os
import stat
from pathlib import Path

import pytest

from serve_app.platform import LORA_KERNEL_CONFIGS, use_tuned_lora_kernels

FOLDER = Path(LORA_KERNEL_CONFIGS)
GPUS = sorted(p.name.removesuffix("_SHRINK.json") for p in FOLDER.glob("*_SHRINK.json"))
# what vLLM's kernel wrappers read from a config (lora_shrink_op.py, lora_expand_op.py)
SHRINK_KEYS = {"block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages", "num_ctas"}
EXPAND_KEYS = {"block_m", "block_n", "block_k", "num_warps", "num_stages", "num_ctas"}
# LoRA layers as vLLM looks their configs up: 1-3 slices, ranks 1, 8 and 16 (widths only pick
# within a table, so one will do)
LAYOUTS = [
    (op, (slices, rank), dict(max_loras=65, hidden_size=3584, rank=rank, num_slices=slices, **extra))
    for op, extra in [("shrink", {}), ("expand", {"add_inputs": True}), ("expand", {"add_inputs": False})]
    for slices, rank in itertools.product([1, 2, 3], [1, 8, 16])
]
LARGEST_STEP = 8192


@pytest.fixture
def vllm_lookup(monkeypatch):
    """vLLM's lookup with the shipped folder, as an engine on that GPU model sees it."""
    import torch
    from vllm.lora.ops.triton_ops import utils

    def lookup(gpu: str):
        monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(FOLDER))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: gpu.replace("_", " "))
        utils.load_lora_op_config.cache_clear()
        utils.get_lora_op_configs.cache_clear()
        return utils.get_lora_op_configs

    yield lookup
    utils.load_lora_op_config.cache_clear()
    utils.get_lora_op_configs.cache_clear()


def test_configs_are_shipped():
    assert GPUS, f"no tuned configs in {FOLDER}"
    for gpu in GPUS:
        for add_inputs in ("TRUE", "FALSE"):
            assert (FOLDER / f"{gpu}_EXPAND_{add_inputs}.json").exists()


@pytest.mark.parametrize("gpu", GPUS)
def test_every_module_layout_batch_and_rank_finds_a_whole_config(gpu, vllm_lookup):
    lookup = vllm_lookup(gpu)
    # slots + 1 as vLLM passes it; 1-3 slices (o/down, gate_up, qkv) and more (other models' merged
    # layers); widths of 7B and 8B models
    for slots, slices, batch, width, rank in itertools.product(
        [2, 9, 65, 257], range(1, 9), [1, 7, 64, 300, 8192], [3584, 4096, 18944], [8, 16, 64]
    ):
        shrink = lookup("shrink", slots, batch, width, rank, slices)
        assert SHRINK_KEYS <= set(shrink) and shrink["split_k"] >= 1 and _tiles(shrink)
        for add_inputs in (True, False):
            expand = lookup("expand", slots, batch, width, rank, slices, add_inputs=add_inputs)
            assert EXPAND_KEYS <= set(expand) and _tiles(expand)


def _tiles(config: dict) -> bool:
    """Block sizes Triton's tl.dot takes: powers of two, at least 16."""
    return all(config[k] >= 16 and config[k] & (config[k] - 1) == 0 for k in ("block_m", "block_n", "block_k"))


def test_shipped_files_are_the_tuning_runs_report(tmp_path, monkeypatch):
    """The files are what bench/lora_kernel_tune.py builds from the report of the runs that
    docs/benchmarks.md cites, so every shipped number can be traced to a measurement."""
    import json
    import shutil

    root = FOLDER.parents[2]
    monkeypatch.syspath_prepend(str(root / "bench"))
    import lora_kernel_tune

    shutil.copy(root / "docs/gpu/lora-kernel-tune-2026-11-30/tune_report.json", tmp_path)
    lora_kernel_tune.ConfigFiles(tmp_path, "NVIDIA H200", {}).write()
    for name in ("SHRINK", "EXPAND_TRUE", "EXPAND_FALSE"):
        rebuilt = json.loads((tmp_path / f"NVIDIA_H200_{name}.json").read_text())
        assert rebuilt == json.loads((FOLDER / f"NVIDIA_H200_{name}.json").read_text()), name


@pytest.mark.parametrize("gpu", GPUS)
def test_decode_with_many_adapters_uses_the_tuned_split(gpu, vllm_lookup, monkeypatch):
    """The lever: vLLM's default splits a 3,584-wide shrink 64 ways with 256-wide blocks, so 50 of
    its splits have no work; the tuned config's splits each have some."""
    lookup = vllm_lookup(gpu)
    tuned = lookup("shrink", 65, 64, 3584, 8, 3)
    assert tuned["split_k"] * tuned["block_k"] <= 3584


def _fake_nvidia_smi(tmp_path: Path, monkeypatch, name: str) -> None:
    tool = tmp_path / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\nprintf '{name}\\n'\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LORAFLEET_DEVICE", "gpu")
    # set, then removed: monkeypatch records the variable, so what the code under test sets is undone
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", "")
    monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER")


def test_engine_on_a_tuned_gpu_model_gets_the_folder(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch, GPUS[0].replace("_", " "))
    assert use_tuned_lora_kernels() == LORA_KERNEL_CONFIGS
    assert os.environ["VLLM_TUNED_CONFIG_FOLDER"] == LORA_KERNEL_CONFIGS


def test_moe_models_keep_vllms_own_tables(tmp_path, monkeypatch):
    """With the variable set vLLM's fused-MoE LoRA kernels stop using its own H200 tables."""
    _fake_nvidia_smi(tmp_path, monkeypatch, GPUS[0].replace("_", " "))
    (tmp_path / "config.json").write_text('{"num_local_experts": 8, "hidden_size": 4096}')
    assert use_tuned_lora_kernels(str(tmp_path)) is None
    assert "VLLM_TUNED_CONFIG_FOLDER" not in os.environ


def test_decided_again_for_every_engine(tmp_path, monkeypatch):
    """The folder lorafleet set for one engine is not taken for the user's choice by the next."""
    _fake_nvidia_smi(tmp_path, monkeypatch, GPUS[0].replace("_", " "))
    assert use_tuned_lora_kernels() == LORA_KERNEL_CONFIGS
    (tmp_path / "config.json").write_text('{"n_routed_experts": 64}')
    assert use_tuned_lora_kernels(str(tmp_path)) is None
    assert "VLLM_TUNED_CONFIG_FOLDER" not in os.environ


def test_a_host_of_mixed_gpu_models_keeps_vllms_defaults(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch, GPUS[0].replace("_", " ") + "\nNVIDIA A10")
    assert use_tuned_lora_kernels() is None


def test_other_gpu_models_keep_vllms_defaults(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch, "NVIDIA A10")
    assert use_tuned_lora_kernels() is None
    assert "VLLM_TUNED_CONFIG_FOLDER" not in os.environ


def test_a_folder_the_user_set_wins(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch, GPUS[0].replace("_", " "))
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path))
    assert use_tuned_lora_kernels() is None
    assert os.environ["VLLM_TUNED_CONFIG_FOLDER"] == str(tmp_path)


def test_cpu_keeps_vllms_defaults(monkeypatch):
    monkeypatch.setenv("LORAFLEET_DEVICE", "cpu")
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", "")
    monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER")
    assert use_tuned_lora_kernels() is None


# vLLM 0.25.1's CUDA-graph sizes on an H200 (max_num_seqs 1024): a step of up to 512 tokens runs padded
CAPTURED = [1, 2, 4, *range(8, 256, 8), *range(256, 513, 16)]


@pytest.fixture(scope="module")
def step_configs():
    """Per GPU model and layout, the config vLLM's own lookup gives a step of M tokens, M = 1..8192."""
    import torch
    from vllm.lora.ops.triton_ops import utils

    configs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(FOLDER))
        for gpu in GPUS:
            patch.setattr(torch.cuda, "get_device_name", lambda *a, name=gpu.replace("_", " "): name)
            utils.load_lora_op_config.cache_clear()
            utils.get_lora_op_configs.cache_clear()
            for op, layout, kw in LAYOUTS:
                by_m = [utils.get_lora_op_configs(op, batch=m, **kw) for m in range(1, LARGEST_STEP + 1)]
                configs[gpu, op, layout] = [tuple(sorted(c.items())) for c in by_m]
    utils.load_lora_op_config.cache_clear()
    utils.get_lora_op_configs.cache_clear()
    return configs


@pytest.mark.parametrize("step_limit", [2047, 4095, 8191, 8192])
@pytest.mark.parametrize("captured", [CAPTURED, []], ids=["cuda-graphs", "eager"])
@pytest.mark.parametrize("gpu", GPUS)
def test_warmup_lengths_reach_every_kernel_variant_a_step_can_meet(gpu, captured, step_limit, step_configs):
    # Triton compiles one kernel per config and per specialisation of its integer arguments: 1,
    # divisible by 16, other. Those that depend on the step's token count M are M and the strides
    # M * rank of the [slices, M, rank] buffer. Every (layout, config, specialisations) that some
    # step up to the limit meets, through vLLM's own lookup, is met by one of the warm-up's prompt
    # lengths (serve_app/engines/lora_warmup.py). The padding to CUDA-graph sizes is the warm-up's
    # own `padded`, a model of vLLM's that the GPU probe checks (bench/lora_warmup_probe.py).
    from serve_app.engines.lora_warmup import padded, token_counts

    lengths = token_counts(str(FOLDER), gpu, step_limit, captured)
    assert len(lengths) < 60 and max(lengths) <= step_limit  # a start's worth of prefills, not a sweep

    def specialised(value: int) -> str:
        return "1" if value == 1 else "D" if value % 16 == 0 else ""

    def variants(steps):
        seen = {padded(m, captured) for m in steps}
        return {
            (op, layout, step_configs[gpu, op, layout][m - 1], specialised(m), specialised(m * kw["rank"]))
            for m in seen
            for op, layout, kw in LAYOUTS
        }

    assert variants(range(1, step_limit + 1)) <= variants(lengths)
