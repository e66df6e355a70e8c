"""`lorafleet export`: merge a LoRA adapter into its base model, or validate and copy a PEFT adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lora_registry.adapter_files import inspect_adapter, is_peft_adapter
from serve_app.errors import ConfigError
from serve_app.folders import check_free, complete_or_nothing
from serve_app.model_types import check_remote_code, resolve_model_dir, trusts_remote_code


def base_dir_for(adapter_path: str, model_type: str | None, model_id_or_path: str | None) -> str:
    """The base checkpoint: given explicitly, or named by the adapter (its sft_args.json, else its
    base_model_name_or_path)."""
    from serve_app.swift_checkpoint import adapter_base, read_sft_args

    if model_type or model_id_or_path:
        return resolve_model_dir(model_type, model_id_or_path)
    base = inspect_adapter(adapter_path, for_vllm=False).base_model_name_or_path  # (PEFT merges any LoRA)
    base_type, base_path = adapter_base(base, read_sft_args(adapter_path))
    if base_type or (base_path and Path(base_path).is_dir()):
        return resolve_model_dir(base_type, base_path)
    raise ConfigError(
        f"cannot tell the base model of '{adapter_path}' (base_model_name_or_path={base!r}); "
        "pass --model_type or --model_id_or_path."
    )


def merge_lora(
    adapter_path: str,
    output_dir: str | None = None,
    model_type: str | None = None,
    model_id_or_path: str | None = None,
    trust_remote_code: bool | None = None,
) -> Path:
    """Write base + adapter as one checkpoint (weights in the base's dtype, tokenizer, chat
    template, generation config) that vLLM and transformers load like any model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve_app.qwen1_convert import servable_adapter

    if not is_peft_adapter(adapter_path):
        raise ConfigError(f"'{adapter_path}' is not a PEFT adapter (no adapter_config.json); nothing to merge.")
    weights = servable_adapter(adapter_path)  # an adapter of a Qwen(1) checkpoint: in Qwen2 names
    base = base_dir_for(adapter_path, model_type, model_id_or_path)
    out = Path(output_dir) if output_dir else Path(f"{str(Path(adapter_path)).rstrip('/')}-merged")
    check_free(out)
    print(f"[export] base {base}\n[export] adapter {adapter_path}", flush=True)
    remote_code = trusts_remote_code(model_type, trust_remote_code)
    check_remote_code(base, remote_code)
    model = AutoModelForCausalLM.from_pretrained(  # merge in full precision
        base, dtype=torch.float32, trust_remote_code=remote_code
    )
    saved_dtype = _checkpoint_dtype(base)
    try:
        merged = PeftModel.from_pretrained(model, weights).merge_and_unload(progressbar=True)
    except ValueError as e:  # peft: the adapter's target modules are not in this base
        raise ConfigError(f"the adapter '{adapter_path}' does not fit the base '{base}': {e}") from None
    print(f"[export] writing {out}", flush=True)
    with complete_or_nothing(out) as partial:
        merged.to(saved_dtype).save_pretrained(partial)
        AutoTokenizer.from_pretrained(base, trust_remote_code=remote_code).save_pretrained(partial)
        copy_generation_config(base, partial)
        _copy_sft_args(adapter_path, partial)
    print(f"[export] done: {out}", flush=True)
    return out


def copy_generation_config(src: str, out: Path) -> None:
    from transformers import GenerationConfig

    try:
        GenerationConfig.from_pretrained(src).save_pretrained(out)
    except OSError:
        pass  # the checkpoint has no generation_config.json


def _copy_sft_args(adapter_path: str, out: Path) -> None:
    """ms-swift's training arguments go with the merge (as ms-swift's own merge does), marked as a
    full checkpoint, so `--ckpt_dir MERGED --load_dataset_config true` finds them."""
    from serve_app.swift_checkpoint import read_sft_args

    if trained := read_sft_args(adapter_path):
        (out / "sft_args.json").write_text(json.dumps({**trained, "sft_type": "full"}, indent=2), encoding="utf-8")


def copy_peft(adapter_path: str, output_dir: str | None = None) -> Path:
    """Validate a PEFT adapter and copy it (the format lorafleet and vLLM serve); an adapter in
    ms-swift's own layout is converted."""
    out = Path(output_dir) if output_dir else Path(f"{str(Path(adapter_path)).rstrip('/')}-peft")
    if swift_lora_dir(adapter_path):
        swift_to_peft(adapter_path, out)
        info = inspect_adapter(out)
        print(
            f"[export] {adapter_path} (ms-swift's LoRA layout) converted to PEFT (rank {info.rank}) in {out}",
            flush=True,
        )
        return out
    info = inspect_adapter(adapter_path)  # raises with what is missing
    with complete_or_nothing(out) as partial:
        shutil.copytree(info.path, partial, dirs_exist_ok=True)
    print(f"[export] {adapter_path} is a valid PEFT LoRA adapter (rank {info.rank}); copied to {out}", flush=True)
    return out


# ms-swift's LoRA config fields that PEFT's LoraConfig does not have.
_SWIFT_ONLY = ("swift_type", "model_key_mapping", "use_qa_lora", "use_merged_linear", "enable_lora", "lora_dtype")


def swift_lora_dir(ckpt_dir: str | Path) -> Path | None:
    """The adapter folder of a checkpoint in ms-swift's own layout (`--tuner_backend swift`, ms-swift
    1.x): `CKPT/default/adapter_config.json` with a `swift_type`; None for any other folder."""
    config = Path(ckpt_dir) / "default" / "adapter_config.json"
    if config.is_file() and "swift_type" in json.loads(config.read_text(encoding="utf-8")):
        return config.parent
    return None


def swift_to_peft(ckpt_dir: str | Path, out: Path) -> Path:
    """ms-swift's LoRA layout as a PEFT adapter: the config without swift's own fields, the tensors
    under PEFT's names (`base_model.model.` prefix, no adapter name), the checkpoint's other files."""
    import dataclasses

    from peft import LoraConfig
    from safetensors.torch import save_file

    src = swift_lora_dir(ckpt_dir)
    config = json.loads((src / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("swift_type") != "LORA":
        raise ConfigError(f"'{ckpt_dir}' holds a {config.get('swift_type')} tuner; only LoRA converts to PEFT.")
    if config.get("use_qa_lora") or config.get("use_merged_linear") or (Path(ckpt_dir) / "extra_states").exists():
        raise ConfigError(f"'{ckpt_dir}' uses QA-LoRA, merged linears or extra states, which PEFT has no form for.")
    accepted = {f.name for f in dataclasses.fields(LoraConfig)}
    peft_config = {k: v for k, v in config.items() if k in accepted and k not in _SWIFT_ONLY}
    peft_config["peft_type"] = "LORA"
    tensors = {_peft_key(key): tensor for key, tensor in adapter_tensors(src).items()}
    with complete_or_nothing(out) as partial:
        for item in Path(ckpt_dir).iterdir():  # configuration.json, sft_args.json, ...
            if item.is_file():
                shutil.copy2(item, partial / item.name)
        (partial / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")
        save_file({k: t.contiguous() for k, t in tensors.items()}, partial / "adapter_model.safetensors")
    return out


def _peft_key(key: str) -> str:
    key = key if key.startswith("base_model.model.") else "base_model.model." + key
    for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
        key = key.replace(f".{part}.default.", f".{part}.").replace(f".{part}.default", f".{part}")
    return key


def adapter_tensors(folder: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    if (folder / "adapter_model.safetensors").is_file():
        return load_file(folder / "adapter_model.safetensors")
    if (folder / "adapter_model.bin").is_file():
        return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise ConfigError(f"'{folder}' has no adapter_model.safetensors or adapter_model.bin.")


def _checkpoint_dtype(path: str):
    import torch

    config = json.loads((Path(path) / "config.json").read_text()) if Path(path, "config.json").exists() else {}
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name, torch.float32)
