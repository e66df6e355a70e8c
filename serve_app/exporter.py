"""`lorafleet export`: merge a LoRA adapter into its base model, or validate and copy a PEFT adapter."""

from __future__ import annotations

import shutil
from pathlib import Path

from lora_registry.adapter_files import inspect_adapter, is_peft_adapter
from serve_app.errors import ConfigError
from serve_app.model_types import MODELS, check_remote_code, resolve_model_dir, trusts_remote_code


def base_dir_for(adapter_path: str, model_type: str | None, model_id_or_path: str | None) -> str:
    """The base checkpoint: given explicitly, or named by the adapter's base_model_name_or_path."""
    if model_type or model_id_or_path:
        return resolve_model_dir(model_type, model_id_or_path)
    base = inspect_adapter(adapter_path).base_model_name_or_path
    if base in MODELS:
        return resolve_model_dir(base, None)
    if base and Path(base).is_dir():
        return resolve_model_dir(None, base)
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
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if not is_peft_adapter(adapter_path):
        raise ConfigError(f"'{adapter_path}' is not a PEFT adapter (no adapter_config.json); nothing to merge.")
    base = base_dir_for(adapter_path, model_type, model_id_or_path)
    out = Path(output_dir) if output_dir else Path(f"{str(Path(adapter_path)).rstrip('/')}-merged")
    print(f"[export] base {base}\n[export] adapter {adapter_path}", flush=True)
    remote_code = trusts_remote_code(model_type, trust_remote_code)
    check_remote_code(base, remote_code)
    model = AutoModelForCausalLM.from_pretrained(  # merge in full precision
        base, dtype=torch.float32, trust_remote_code=remote_code
    )
    saved_dtype = _checkpoint_dtype(base)
    merged = PeftModel.from_pretrained(model, adapter_path).merge_and_unload(progressbar=True)
    print(f"[export] writing {out}", flush=True)
    merged.to(saved_dtype).save_pretrained(out)
    AutoTokenizer.from_pretrained(base, trust_remote_code=remote_code).save_pretrained(out)
    try:
        GenerationConfig.from_pretrained(base).save_pretrained(out)
    except OSError:
        pass  # the base has no generation_config.json
    print(f"[export] done: {out}", flush=True)
    return out


def copy_peft(adapter_path: str, output_dir: str | None = None) -> Path:
    """Validate a PEFT adapter and copy it (the format lorafleet and vLLM serve)."""
    info = inspect_adapter(adapter_path)  # raises with what is missing
    out = Path(output_dir) if output_dir else Path(f"{str(Path(adapter_path)).rstrip('/')}-peft")
    shutil.copytree(info.path, out, dirs_exist_ok=True)
    print(f"[export] {adapter_path} is a valid PEFT LoRA adapter (rank {info.rank}); copied to {out}", flush=True)
    return out


def _checkpoint_dtype(path: str):
    import json

    import torch

    config = json.loads((Path(path) / "config.json").read_text()) if Path(path, "config.json").exists() else {}
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name, torch.float32)
