"""An offline engine plus template and settings, as `lorafleet infer` uses them."""

from __future__ import annotations

import argparse
from dataclasses import replace

from serve_app.cli import engine_options_from_args
from serve_app.errors import ConfigError
from serve_app.model_types import (
    MODELS,
    check_remote_code,
    get_default_template_type,
    resolve_model_dir,
    trusts_remote_code,
)
from serve_app.offline import OfflineEngine, get_pt_engine, inference_stream_vllm, start_vllm_engine
from serve_app.template import get_template


class ChatSession:
    """Streams answers for one conversation at a time; the first adapter given is the active one."""

    def __init__(self, engine: OfflineEngine, template, adapter, system: str | None):
        self.engine, self.template, self.adapter, self.system = engine, template, adapter, system

    def stream(self, query: str, history: list, system: str | None):
        _, used = self.template.encode(query, history, system, max_length=self.engine.max_model_len - 1)
        notice = None
        if len(used) < len(history):
            notice = f"history trimmed to the last {len(used)} of {len(history)} turns to fit the context"
            del history[: len(history) - len(used)]
        request = {"query": query, "history": history, "system": system}
        for results in inference_stream_vllm(self.engine, self.template, [request], lora_request=self.adapter):
            yield results[0]["response"], notice
            notice = None

    def repl(self):
        from serve_app.chat_repl import ChatRepl

        return ChatRepl(self.stream, self.system, self.engine.is_chat)


def build_chat_session(args: argparse.Namespace, choice) -> ChatSession:
    from serve_app.messages import AdapterRef

    if choice.adapters and args.infer_backend == "vllm" and not args.vllm_enable_lora:
        raise ConfigError(
            "this checkpoint is a LoRA adapter: pass --vllm_enable_lora true to serve it through vLLM LoRA, "
            "or merge it first with `lorafleet export --ckpt_dir DIR --merge_lora true`."
        )
    engine = _start_engine(args, choice)
    _apply_generation_flags(engine, args)
    template_type = choice.template_type or _template_type(choice)
    template = get_template(template_type, engine.hf_tokenizer)
    adapter = None
    if choice.adapters:
        name, path = next(iter(choice.adapters.items()))
        adapter = engine.adapter_ref(AdapterRef(name, 1, path))
        print(f"[lorafleet] answering with adapter '{name}' ({path})")
    return ChatSession(engine, template, adapter, choice.system)


def _start_engine(args, choice) -> OfflineEngine:
    options = engine_options_from_args(args, choice)
    model_dir = resolve_model_dir(choice.model_type, choice.model_id_or_path)
    options.trust_remote_code = trusts_remote_code(choice.model_type, options.trust_remote_code)
    if args.infer_backend == "pt":
        return get_pt_engine(
            choice.model_type,
            None if options.dtype == "auto" else options.dtype,
            model_id_or_path=choice.model_id_or_path,
            max_model_len=options.max_model_len,
            trust_remote_code=options.trust_remote_code,
        )
    check_remote_code(model_dir, options.trust_remote_code)
    return start_vllm_engine(model_dir, choice.model_type, options, adapters=list(choice.adapters.values()))


def _template_type(choice) -> str:
    if choice.model_type in MODELS:
        return get_default_template_type(choice.model_type)
    return "jinja"


def _apply_generation_flags(engine: OfflineEngine, args) -> None:
    flags = {
        k: getattr(args, k)
        for k in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")
        if getattr(args, k, None) is not None
    }
    engine.generation_config = replace(engine.generation_config, **flags)
