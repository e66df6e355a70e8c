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


def inspect_adapter(path: str | Path, for_vllm: bool = True) -> AdapterInfo:
    """Metadata of the PEFT adapter at `path`; ConfigError names what is missing. `for_vllm`: also
    refuse the LoRA variants vLLM cannot serve (not for a merge, which PEFT does whole)."""
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
    config = _read_config(config_file)
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(
            f"'{path}' is a {config.get('peft_type')} adapter; only LoRA adapters can be served.", param="lora_path"
        )
    if for_vllm:
        _check_engine_can_load(path, config)
    shapes = _safetensors_shapes(weights) if weights.suffix == ".safetensors" else {}
    return AdapterInfo(
        path=str(path.resolve()),
        rank=_rank(path, config, shapes),
        target_modules=_targets(path, config),
        base_model_name_or_path=str(config.get("base_model_name_or_path") or ""),
        shapes=shapes,
    )


def _read_config(config_file: Path) -> dict:
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as e:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        raise ConfigError(f"'{config_file}' is not valid JSON ({e}).", param="lora_path") from None
    if not isinstance(config, dict):
        raise ConfigError(f"'{config_file}' is not a JSON object, so not a PEFT config.", param="lora_path")
    return config


def _rank(path: Path, config: dict, shapes: dict) -> int:
    """The adapter's largest rank, as vLLM takes it: `r` (PEFT's default 8) and any rank_pattern's.
    Without a rank_pattern the weights must have rank `r` (a config edited apart from its weights)."""
    r = config.get("r", 8)
    pattern = config.get("rank_pattern") or {}
    ranks = [r, *pattern.values()] if isinstance(pattern, dict) else [r, pattern]
    if any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in ranks):
        raise ConfigError(
            f"'{path}': adapter_config.json has r = {r!r}, rank_pattern = {pattern!r}; ranks must be whole numbers "
            "above 0.",
            param="lora_path",
        )
    found = {shape[0] if side == "A" else shape[1] for side, shape in _lora_shapes(shapes)}
    if found and found != {r} and not pattern:
        raise ConfigError(
            f"'{path}': adapter_config.json has r = {r} but its weights have rank {sorted(found)}; "
            "save the adapter again with save_pretrained.",
            param="lora_path",
        )
    return max(ranks)


def _targets(path: Path, config: dict) -> tuple[str, ...]:
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets:  # (PEFT also takes a regular expression)
        return (targets,)
    if not targets and config.get("target_parameters"):  # LoRA on parameters (MoE experts) only
        return ()
    if not targets or not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ConfigError(
            f"'{path}': adapter_config.json has target_modules = {targets!r}; it must name the modules the "
            "adapter changes (PEFT writes them).",
            param="lora_path",
        )
    return tuple(sorted(targets))


def _lora_shapes(shapes: dict):
    """(side "A" or "B", shape) of each LoRA weight of a linear module (2-d; not LoRA on a parameter,
    such as MoE experts' `experts.base_layer`, whose A rows are rank x experts)."""
    for name, shape in shapes.items():
        if (match := _LORA_KEY.search(name)) and len(shape) == 2 and ".base_layer." not in name:
            yield match[3], shape


def _check_engine_can_load(path: Path, config: dict) -> None:
    """LoRA variants vLLM cannot serve are refused at registration, not at every request after it."""
    if config.get("use_dora"):
        raise ConfigError(
            f"'{path}' is a DoRA adapter (use_dora: true); vLLM serves plain LoRA only. Merge it instead.",
            param="lora_path",
        )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise ConfigError(
            f"'{path}' trains biases too (bias: {config.get('bias')!r}, lora_bias: {config.get('lora_bias')!r}); "
            "vLLM serves LoRA weights without biases. Merge the adapter into the model instead.",
            param="lora_path",
        )
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ConfigError(
            f"'{path}': adapter_config.json has lora_alpha = {alpha!r}; it must be a number.", param="lora_path"
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
            param="lora_path",
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
    """Tensor name -> shape, from the header; a file cut short or not safetensors is refused here,
    not by the engine at the adapter's first request."""
    on_disk = path.stat().st_size
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > min(on_disk - 8, 100 * 2**20):  # (the safetensors library's own header limit)
                raise ValueError(f"its header says {size} bytes, the file has {on_disk}")
            header = json.loads(f.read(size))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
        if 8 + size + end > on_disk:
            raise ValueError(f"it is cut short: {on_disk} bytes of {8 + size + end}")
        return {k: list(v["shape"]) for k, v in tensors.items()}
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise ConfigError(
            f"'{path}' is not a readable safetensors file ({e}); save the adapter again.", param="lora_path"
        ) from None
