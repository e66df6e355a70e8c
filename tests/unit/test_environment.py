"""The install removed the CUDA-linked torchvision trio: transformers model classes import."""

import importlib.util


def test_transformers_model_classes_import():
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM  # noqa: F401

    assert Qwen2ForCausalLM.__name__ == "Qwen2ForCausalLM"


def test_cuda_linked_torchvision_is_absent_on_cpu():
    import torch

    if torch.version.cuda is None:
        assert importlib.util.find_spec("torchvision") is None
        assert importlib.util.find_spec("torchaudio") is None


def test_vllm_public_api_we_rely_on_exists():
    from vllm import AsyncEngineArgs, SamplingParams  # noqa: F401
    from vllm.inputs import TokensPrompt  # noqa: F401
    from vllm.lora.request import LoRARequest  # noqa: F401
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    for method in ("generate", "add_lora", "remove_lora", "list_loras", "check_health", "shutdown"):
        assert callable(getattr(AsyncLLM, method)), method
    assert RequestOutputKind.DELTA
