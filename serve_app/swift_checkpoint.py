"""What `--ckpt_dir` means, as in ms-swift: a full checkpoint or a LoRA adapter, plus the training
arguments ms-swift saves beside it (`sft_args.json`: model type, template, system prompt, datasets)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from serve_app.errors import ConfigError


@dataclass(frozen=True)
class ModelChoice:
    """What the model flags resolve to: the base checkpoint, the adapters to serve on it, and the
    template and system prompt (given, or read from the checkpoint's sft_args.json)."""

    model_type: str | None
    model_id_or_path: str | None
    adapters: dict[str, str] = field(default_factory=dict)
    template_type: str | None = None
    system: str | None = None


def read_sft_args(ckpt_dir: str | None) -> dict:
    """ms-swift's sft_args.json in the checkpoint folder (or its parent, the run folder); {} if none."""
    if not ckpt_dir:
        return {}
    for folder in (Path(ckpt_dir), Path(ckpt_dir).parent):
        path = folder / "sft_args.json"
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}).") from None
    return {}


def _local_dir(path: str | None) -> str | None:
    return path if path and Path(path).is_dir() else None


def adapter_base(base_name: str | None, trained: dict) -> tuple[str | None, str | None]:
    """(model_type, model_id_or_path) of an adapter's base: a local folder that sft_args.json or the
    adapter names (ms-swift records its download folder) wins over a download; sft_args.json's model
    type names it, else the adapter's base name when it is a model type, else that name as a path or
    hub id."""
    from serve_app.model_types import MODELS

    local = _local_dir(trained.get("model_id_or_path")) or _local_dir(base_name)
    if trained.get("model_type") in MODELS:
        return trained["model_type"], local
    if base_name in MODELS:
        return base_name, local
    return None, local or base_name


def resolve_model_choice(args) -> ModelChoice:
    """Apply ms-swift's rules: `--ckpt_dir` of an adapter means its base plus `default-lora` (or,
    with `--merge_lora true`, the two merged); sft_args.json supplies what the flags leave unset."""
    from lora_registry.adapter_files import inspect_adapter, is_peft_adapter
    from serve_app.model_types import MODELS
    from serve_app.template import known_template_types

    adapters = {name: peft_form(path) for name, path in parse_lora_modules(args.lora_modules).items()}
    model_type, path = args.model_type, args.model_id_or_path
    trained = read_sft_args(args.ckpt_dir)
    trained_type = trained.get("model_type") if trained.get("model_type") in MODELS else None
    ckpt_dir = peft_form(args.ckpt_dir) if args.ckpt_dir else None
    if ckpt_dir and is_peft_adapter(ckpt_dir):
        info = inspect_adapter(ckpt_dir, for_vllm=not getattr(args, "merge_lora", False))  # (a merge takes any)
        if model_type is None and path is None:
            model_type, path = adapter_base(info.base_model_name_or_path, trained)
        if getattr(args, "merge_lora", False):
            path = merged_checkpoint(info.path, model_type, path, args.trust_remote_code, name=args.ckpt_dir)
        else:
            adapters = {"default-lora": info.path, **adapters}
    elif args.ckpt_dir:
        if getattr(args, "merge_lora", False):
            raise SystemExit(
                f"lorafleet: --merge_lora true needs a LoRA adapter in --ckpt_dir; '{args.ckpt_dir}' is not one."
            )
        path, model_type = args.ckpt_dir, model_type or trained_type
    if model_type is None and path is None:
        model_type = "tiny-chat"
    template_type = args.template_type or (
        trained.get("template_type") if trained.get("template_type") in known_template_types() else None
    )
    system = args.system if args.system is not None else trained.get("system")
    return ModelChoice(model_type, path, adapters, template_type, system)


def peft_form(ckpt_dir: str) -> str:
    """`ckpt_dir`, or for an adapter in ms-swift's own layout its PEFT conversion `<ckpt_dir>-peft`
    (made once, as `swift export --to_peft_format true` names it); an adapter of a Qwen(1)
    checkpoint in the converted base's names (serve_app/qwen1_convert.py)."""
    from serve_app import exporter
    from serve_app.qwen1_convert import servable_adapter

    if not exporter.swift_lora_dir(ckpt_dir):
        return servable_adapter(ckpt_dir)
    out = Path(f"{ckpt_dir.rstrip('/')}-peft")
    if not (out / "adapter_config.json").is_file():
        print(f"[lorafleet] {ckpt_dir} is in ms-swift's own LoRA layout; converting it to PEFT in {out}", flush=True)
        exporter.swift_to_peft(ckpt_dir, out)
    return servable_adapter(str(out))


def merged_checkpoint(
    adapter_dir: str, model_type: str | None, base_path: str | None, trust_remote_code, name: str | None = None
) -> str:
    """The adapter merged into its base, in `<name>-merged` as ms-swift writes it (name: the
    --ckpt_dir given; the adapter folder by default); made once."""
    from serve_app import exporter

    out = Path(f"{str(name or adapter_dir).rstrip('/')}-merged")
    if (out / "config.json").is_file():
        print(f"[lorafleet] using the merged checkpoint {out} (made earlier; delete it to merge again)", flush=True)
        return str(out)
    return str(exporter.merge_lora(adapter_dir, str(out), model_type, base_path, trust_remote_code))


def parse_lora_modules(items: list[str]) -> dict[str, str]:
    adapters = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--lora_modules takes NAME=PATH pairs, got '{item}' (e.g. xiao-huang=/path/to/adapter)")
        adapters[name] = path
    return adapters
