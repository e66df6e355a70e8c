"""The table of model types: hub id, template, chat or generation, default generation settings."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

from serve_app.errors import ConfigError
from serve_app.qwen1_convert import is_qwen1, servable_dir

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_CHAT_DIR = ASSETS / "tiny-chat"
XIAO_HUANG_DIR = ASSETS / "xiao-huang"


class ModelType:
    """Model type names, as ms-swift spells them (`ModelType.qwen_7b_chat == 'qwen-7b-chat'`)."""

    qwen_7b_chat = "qwen-7b-chat"
    qwen_7b = "qwen-7b"
    chatglm3_6b = "chatglm3-6b"
    yi_6b_chat = "yi-6b-chat"
    llama2_7b_chat = "llama2-7b-chat"
    llama3_8b_instruct = "llama3-8b-instruct"
    qwen1half_7b_chat_int4 = "qwen1half-7b-chat-int4"
    tiny_chat = "tiny-chat"


@dataclass(frozen=True)
class ModelInfo:
    """What lorafleet knows about a model type before loading it."""

    model_type: str
    hub_id: str
    template_type: str
    is_chat: bool = True
    generation: dict = field(default_factory=dict)
    trust_remote_code: bool = False  # the checkpoint ships its own model/tokenizer code (auto_map)
    tool_call_format: str | None = None  # how its chat template writes tool calls (deployments/http/tool_calls.py)
    qwen1_layout: bool = False  # a Qwen(1) checkpoint, served after conversion (serve_app/qwen1_convert.py)


_SAMPLING = dict(max_new_tokens=2048, temperature=0.3, top_p=0.7, top_k=20, repetition_penalty=1.05)

MODELS: dict[str, ModelInfo] = {
    info.model_type: info
    for info in [
        ModelInfo("qwen-7b-chat", "Qwen/Qwen-7B-Chat", "qwen", generation=_SAMPLING, qwen1_layout=True),
        ModelInfo(
            "qwen-7b", "Qwen/Qwen-7B", "default-generation", is_chat=False, generation=_SAMPLING, qwen1_layout=True
        ),
        ModelInfo("chatglm3-6b", "THUDM/chatglm3-6b", "chatglm3", generation=_SAMPLING, trust_remote_code=True),
        ModelInfo("yi-6b-chat", "01-ai/Yi-6B-Chat", "chatml", generation=_SAMPLING),
        ModelInfo("llama2-7b-chat", "meta-llama/Llama-2-7b-chat-hf", "llama", generation=_SAMPLING),
        ModelInfo(
            "llama3-8b-instruct",
            "meta-llama/Meta-Llama-3-8B-Instruct",
            "llama3",
            generation=_SAMPLING,
            tool_call_format="llama3_json",
        ),
        ModelInfo("qwen1half-7b-chat-int4", "Qwen/Qwen1.5-7B-Chat-GPTQ-Int4", "qwen", generation=_SAMPLING),
        ModelInfo(
            "tiny-chat",
            str(TINY_CHAT_DIR),
            "qwen",
            generation=dict(max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=-1, repetition_penalty=1.0),
            tool_call_format="hermes",
        ),
    ]
}


def get_model_info(model_type: str) -> ModelInfo:
    """The table row for `model_type`; an unknown name gets the closest matches."""
    if model_type in MODELS:
        return MODELS[model_type]
    close = difflib.get_close_matches(model_type, MODELS, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(
        f"unknown model_type '{model_type}'.{hint} Known model types: {', '.join(MODELS)}. "
        "For another model pass model_id_or_path=LOCAL_DIR (and template_type).",
        param="model_type",
    )


def trusts_remote_code(model_type: str | None, asked: bool | None = None) -> bool:
    """Whether to run a checkpoint's own code: as asked, else what its model type needs (off for paths)."""
    if asked is not None:
        return asked
    return bool(model_type) and get_model_info(model_type).trust_remote_code


def check_remote_code(model_dir: str, trust_remote_code: bool) -> None:
    """A local checkpoint that ships its own code (`auto_map`) loads only when trusted: say so up front,
    instead of transformers' interactive prompt or a failure deep inside the engine."""
    if trust_remote_code or not Path(model_dir).is_dir() or is_qwen1(model_dir):  # converted: its code never runs
        return
    for name in ("config.json", "tokenizer_config.json"):
        path = Path(model_dir) / name
        if path.exists() and "auto_map" in json.loads(path.read_text()):
            raise ConfigError(
                f"checkpoint '{model_dir}' ships its own Python code ({name} has auto_map); loading it runs "
                "that code. If you trust it, pass trust_remote_code: true (engine option; CLI --trust_remote_code true).",
                param="trust_remote_code",
            )


def get_default_template_type(model_type: str) -> str:
    return get_model_info(model_type).template_type


def resolve_model_dir(model_type: str | None, model_id_or_path: str | None) -> str:
    """The checkpoint to load: an explicit path wins; otherwise the model type's hub id or embedded dir."""
    if model_id_or_path:
        path = Path(model_id_or_path).expanduser()
        if path.exists():
            if not (path / "config.json").exists():
                raise ConfigError(
                    f"checkpoint dir '{path}' has no config.json; point model_id_or_path at a Hugging Face "
                    "model folder (config.json, tokenizer, weights).",
                    param="model_id_or_path",
                )
            return servable_dir(str(path.resolve()))
        if model_id_or_path.startswith((".", "/", "~")) or model_id_or_path.count("/") != 1:
            raise ConfigError(
                f"checkpoint dir '{model_id_or_path}' does not exist; check the path (or pass a hub id 'org/name').",
                param="model_id_or_path",
            )
        return model_id_or_path
    if not model_type:
        raise ConfigError("give model_type or model_id_or_path.", param="model_type")
    info = get_model_info(model_type)
    if info.qwen1_layout:  # vLLM cannot load the hub's folder as it is: fetch it and convert it
        return servable_dir(_download(info.hub_id))
    return info.hub_id


def _download(hub_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(hub_id)
    except Exception as e:  # offline, no access, unknown id: each its own huggingface_hub error
        raise ConfigError(
            f"cannot download {hub_id} ({type(e).__name__}: {e}); download it yourself and pass "
            "model_id_or_path=LOCAL_DIR (CLI --model_id_or_path).",
            param="model_id_or_path",
        ) from None


# Where checkpoints' configs state their context length (the keys vLLM reads too).
_CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)


def context_length(model_dir: str, max_model_len: int | None, trust_remote_code: bool) -> int:
    """A served model's context length, decided here only: the configured `max_model_len`, else the
    smallest length the checkpoint's config states. vLLM would derive at least as much (it also
    stretches by rope scaling), so the engine accepts the number and the renderer's checks match it."""
    if max_model_len:
        return max_model_len
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"cannot read the config of '{model_dir}' to find its context length ({e}); set max_model_len.",
            param="max_model_len",
        ) from None
    config = getattr(config, "text_config", None) or config
    found = [value for key in _CONTEXT_KEYS if isinstance(value := getattr(config, key, None), int)]
    if not found:
        raise ConfigError(f"'{model_dir}' does not state its context length; set max_model_len.", param="max_model_len")
    return min(found)
