"""Renderer deployment: conversations -> prompt token ids, on the CPU, before anything reaches an engine."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

from serve_app.config import AppConfig, ModelConfig
from serve_app.errors import InvalidRequestError, PromptTooLongError
from serve_app.messages import AdapterRef, RenderedPrompt, RenderRequest
from serve_app.platform import freeze_startup_heap, set_up_replica_logging


class Renderer:
    """Holds the tokenizer and template of every served base model."""

    def __init__(self, models: list[ModelConfig]):
        set_up_replica_logging()
        self._models = {m.served_name: _ModelTemplate.load(m) for m in models}
        freeze_startup_heap()

    @classmethod
    def get_deployment_options(cls, config: AppConfig) -> dict:
        return config.renderer.deployment.serve_options("Renderer")

    async def render(self, request: RenderRequest) -> RenderedPrompt:
        # On the event loop, not in a worker thread: a thread's pickup measured ~1 ms (median, 64 streams,
        # CPU) against ~0.6 ms of work for a 512-token prompt. Long prompts under load get more replicas.
        started = time.perf_counter()
        rendered = self._models[request.model].render(request)
        return dataclasses.replace(rendered, render_s=time.perf_counter() - started)

    async def tokenize(self, request: RenderRequest, add_special_tokens: bool, with_strings: bool) -> dict:
        """`/tokenize`'s answer: the ids a prompt or conversation renders to, as the engine would get them."""
        model = self._models[request.model]
        if request.messages is not None:
            text = model._chat_text(request)
        else:
            text = request.prompt
        ids = list(model.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        out = {"count": len(ids), "max_model_len": model.max_model_len, "tokens": ids}
        if with_strings:
            out["token_strs"] = model.tokenizer.convert_ids_to_tokens(ids)
        return out

    async def detokenize(self, model: str, ids: tuple[int, ...]) -> str:
        template = self._models[model]
        template._check_vocabulary(list(ids), param="tokens")
        return template.tokenizer.decode(list(ids))


@functools.lru_cache(maxsize=256)
def adapter_chat_template(adapter: AdapterRef) -> str | None:
    """The chat template an adapter folder ships (as LoRAX reads it), or None: then the base's is
    used. Read once per registration: new weights, even at the same path, get a new adapter id."""
    folder = Path(adapter.path)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "tokenizer_config.json").is_file():
        template = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None


@dataclass
class _ModelTemplate:
    """A named (ms-swift) template, or None: the checkpoint's own chat template through transformers."""

    template: object
    tokenizer: object
    named: bool
    max_model_len: int
    default_system: str | None = None  # for chats that send no system message (the config's)

    @classmethod
    def load(cls, model: ModelConfig) -> _ModelTemplate:
        from transformers import AutoTokenizer

        from serve_app.model_types import context_length, get_default_template_type, resolve_model_dir
        from serve_app.template import get_template

        path = resolve_model_dir(model.model_type, model.model_id_or_path)
        remote_code = model.engine.trust_remote_code
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote_code)
        # The checkpoint's own chat template by default (it knows the model's tool format); a
        # template named in the config, or the model type's when the checkpoint has none.
        template_type = model.template_type or (
            "jinja"
            if getattr(tokenizer, "chat_template", None)
            else get_default_template_type(model.model_type)
            if model.model_type
            else "jinja"
        )
        max_len = context_length(path, model.engine.max_model_len, bool(remote_code))
        template = get_template(template_type, tokenizer, default_system=model.default_system)
        return cls(template, tokenizer, template_type != "jinja", max_len, model.default_system)

    def render(self, request: RenderRequest) -> RenderedPrompt:
        if request.messages is not None:
            ids = self.template.tokenize(self._chat_text(request))
        elif isinstance(request.prompt, str):
            ids = self.template.tokenize(request.prompt)
        else:
            ids = list(request.prompt or ())
            self._check_vocabulary(ids, param="prompt")
        if request.truncate_prompt_tokens:
            ids = ids[-request.truncate_prompt_tokens :]
        if not ids:
            raise InvalidRequestError("the prompt is empty.", param="prompt")
        text = ""
        if request.return_text:  # what the model saw: the text given, or its truncated tail
            untouched = isinstance(request.prompt, str) and not request.truncate_prompt_tokens
            text = request.prompt if untouched else self.tokenizer.decode(ids)
        return RenderedPrompt(
            tuple(ids),
            self._max_tokens(len(ids), request.max_tokens, "messages" if request.messages is not None else "prompt"),
            tuple(self.template.stop_token_ids),
            text,
        )

    def _chat_text(self, request: RenderRequest) -> str:
        messages = list(request.messages)
        if self.default_system is not None and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.default_system})
        own = adapter_chat_template(request.adapter) if request.adapter else None
        if self.named and own is None:
            text = self._named_template_text(request, messages)
        else:
            from serve_app.template import template_messages

            if not (own or getattr(self.tokenizer, "chat_template", None)):
                raise InvalidRequestError("this model's tokenizer has no chat template; use /v1/completions.")
            try:
                text = self.tokenizer.apply_chat_template(
                    template_messages(messages),
                    chat_template=own,
                    tools=list(request.tools) or None,
                    add_generation_prompt=request.add_generation_prompt and not request.continue_final_message,
                    continue_final_message=request.continue_final_message,
                    tokenize=False,
                )
            except Exception as e:  # the checkpoint's template raised on this conversation
                raise InvalidRequestError(f"the model's chat template cannot render these messages: {e}") from None
        return text

    def _named_template_text(self, request: RenderRequest, messages: list[dict]) -> str:
        """ms-swift's templates take (system, history, query); a final assistant message is continued."""
        from serve_app.template import messages_to_conversation

        name = self.template.template_type
        if request.tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            raise InvalidRequestError(
                f"template '{name}' cannot render tools or tool calls; serve the checkpoint's own chat template "
                "(leave template_type unset).",
                param="tools",
            )
        prefill = ""
        if messages[-1]["role"] == "assistant" and (
            request.continue_final_message or not request.add_generation_prompt
        ):
            prefill = messages.pop()["content"] or ""
        system, history, query = messages_to_conversation(messages)
        return self.template.render(query, history, system) + prefill

    def _check_vocabulary(self, ids: list[int], param: str) -> None:
        size = len(self.tokenizer)
        if bad := [i for i in ids if i >= size]:
            raise InvalidRequestError(
                f"token id {bad[0]} is out of the vocabulary (ids run from 0 to {size - 1}).", param=param
            )

    def _max_tokens(self, prompt_len: int, asked: int | None, prompt_param: str) -> int:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise PromptTooLongError(prompt_len, self.max_model_len, prompt_param)
        if asked is not None and asked > room:
            raise InvalidRequestError(
                f"max_tokens={asked} does not fit: the prompt has {prompt_len} tokens and the context holds "
                f"{self.max_model_len}, so at most {room} tokens can be generated.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return asked if asked is not None else room
