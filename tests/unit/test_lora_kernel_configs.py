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
    # slots + 1 as vLLM passes it; 1-3 slices (o/down, gate_up, qkv); widths of 7B and 8B models
    for slots, slices, batch, width, rank in itertools.product(
        [2, 9, 65, 257], [1, 2, 3], [1, 7, 64, 300, 8192], [3584, 4096, 18944], [8, 16, 64]
    ):
        shrink = lookup("shrink", slots, batch, width, rank, slices)
        assert SHRINK_KEYS <= set(shrink) and shrink["split_k"] >= 1
        for add_inputs in (True, False):
            expand = lookup("expand", slots, batch, width, rank, slices, add_inputs=add_inputs)
            assert EXPAND_KEYS <= set(expand)


@pytest.mark.parametrize("gpu", GPUS)
def test_decode_with_many_adapters_uses_the_tuned_split(gpu, vllm_lookup, monkeypatch):
    """The lever: vLLM's default splits a 3,584-wide shrink 64 ways with 256-wide blocks, so 50 of
    its splits have no work; the tuned config's splits each have some."""
    lookup = vllm_lookup(gpu)
    tuned = lookup("shrink", 65, 64, 3584, 8, 3)
    assert tuned["split_k"] * tuned["block_k"] <= 3584
    monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER")
    from vllm.lora.ops.triton_ops import utils

    utils.load_lora_op_config.cache_clear()
    utils.get_lora_op_configs.cache_clear()
    default = utils.get_lora_op_configs("shrink", 65, 64, 3584, 8, 3)
    assert default["split_k"] * default["block_k"] > 3584


def _fake_nvidia_smi(tmp_path: Path, monkeypatch, name: str) -> None:
    tool = tmp_path / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\necho '{name}'\n")
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
