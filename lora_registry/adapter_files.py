"""Reading and checking PEFT adapter folders before any engine touches them.

Only metadata is read: adapter_config.json and the safetensors header (tensor shapes), never weights.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from serve_app.errors import ConfigError

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_LORA_KEY = re.compile(r"layers\.(\d+)\..*?(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


@dataclass(frozen=True)
class AdapterInfo:
    path: str
    rank: int
    target_modules: tuple[str, ...]
    base_model_name_or_path: str
    shapes: dict  # tensor name -> shape, from the safetensors header


def is_peft_adapter(path: str | Path) -> bool:
    path = Path(path)
    return (path / "adapter_config.json").is_file()


def inspect_adapter(path: str | Path) -> AdapterInfo:
    """Metadata of the PEFT adapter at `path`; ConfigError names what is missing."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"adapter path '{path}' is not a directory; pass the folder that save_pretrained wrote.", param="lora_path"
        )
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise ConfigError(f"'{path}' is not a PEFT adapter: adapter_config.json is missing.", param="lora_path")
    weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if weights is None:
        raise ConfigError(
            f"'{path}' has adapter_config.json but no weights ({' or '.join(WEIGHT_FILES)}).", param="lora_path"
        )
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(
            f"'{path}' is a {config.get('peft_type')} adapter; only LoRA adapters can be served.", param="lora_path"
        )
    _check_engine_can_load(path, config)
    targets = config.get("target_modules") or []
    targets = (targets,) if isinstance(targets, str) else tuple(sorted(targets))
    return AdapterInfo(
        path=str(path.resolve()),
        rank=int(config.get("r", 8)),
        target_modules=targets,
        base_model_name_or_path=str(config.get("base_model_name_or_path") or ""),
        shapes=_safetensors_shapes(weights) if weights.suffix == ".safetensors" else {},
    )


def _check_engine_can_load(path: Path, config: dict) -> None:
    """LoRA variants vLLM cannot serve are refused at registration, not at every request after it."""
    if config.get("use_dora"):
        raise ConfigError(
            f"'{path}' is a DoRA adapter (use_dora: true); vLLM serves plain LoRA only. Merge it instead.",
            param="lora_path",
        )
    if config.get("modules_to_save"):
        raise ConfigError(
            f"'{path}' also trains whole modules (modules_to_save: {config['modules_to_save']}); vLLM serves the "
            "LoRA weights only. Merge the adapter into the model, or train without modules_to_save.",
            param="lora_path",
        )


def check_adapter_fits(info: AdapterInfo, base_config: dict, max_lora_rank: int, force: bool = False) -> None:
    """Raise ConfigError unless the adapter's rank and tensor shapes fit the served base model."""
    if info.rank > max_lora_rank:
        raise ConfigError(
            f"adapter '{info.path}' has rank {info.rank} but the engine allows max_lora_rank={max_lora_rank}; "
            f"start the engine with max_lora_rank >= {info.rank}.",
            param="max_lora_rank",
        )
    if force:
        return
    if problem := _shape_mismatch(info.shapes, base_config):
        raise ConfigError(
            f"adapter '{info.path}' was trained for another base model ({info.base_model_name_or_path or 'unknown'}): "
            f"{problem}. Use an adapter trained on this model, or force the registration if you are sure.",
            param="lora_path",
        )


def _expected_dims(config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-targetable linear layer of a decoder model."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    inter = config.get("intermediate_size", 4 * hidden)
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def _shape_mismatch(shapes: dict, config: dict) -> str | None:
    expected = _expected_dims(config)
    layers = config.get("num_hidden_layers", 0)
    for name, shape in shapes.items():
        match = _LORA_KEY.search(name)
        if not match:
            continue
        layer, module, side = int(match[1]), match[2], match[3]
        if layers and layer >= layers:
            return f"it has layer {layer} but the base model has {layers} layers"
        if module in expected:
            dim = expected[module][0] if side == "A" else expected[module][1]
            got = shape[1] if side == "A" else shape[0]
            if got != dim:
                return f"{module} expects {dim} features, the adapter's lora_{side} has {got}"
    return None


def _safetensors_shapes(path: Path) -> dict:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
