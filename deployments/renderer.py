"""Renderer deployment: conversations -> prompt token ids, on the CPU, before anything reaches an engine."""

from __future__ import annotations

from dataclasses import dataclass

from serve_app.config import AppConfig, ModelConfig
from serve_app.errors import InvalidRequestError, PromptTooLongError
from serve_app.messages import RenderedPrompt, RenderRequest
from serve_app.platform import freeze_startup_heap


class Renderer:
    """Holds the tokenizer and template of every served base model."""

    def __init__(self, models: list[ModelConfig]):
        self._models = {m.served_name: _ModelTemplate.load(m) for m in models}
        freeze_startup_heap()

    @classmethod
    def get_deployment_options(cls, config: AppConfig) -> dict:
        return config.renderer.deployment.serve_options("Renderer")

    async def render(self, request: RenderRequest) -> RenderedPrompt:
        return self._models[request.model].render(request)


@dataclass
class _ModelTemplate:
    template: object
    max_model_len: int

    @classmethod
    def load(cls, model: ModelConfig) -> _ModelTemplate:
        from transformers import AutoConfig, AutoTokenizer

        from serve_app.model_types import get_default_template_type, resolve_model_dir
        from serve_app.template import get_template

        path = resolve_model_dir(model.model_type, model.model_id_or_path)
        remote_code = model.engine.trust_remote_code
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote_code)
        template_type = model.template_type or (
            get_default_template_type(model.model_type) if model.model_type else "jinja"
        )
        max_len = (
            model.engine.max_model_len
            or AutoConfig.from_pretrained(path, trust_remote_code=remote_code).max_position_embeddings
        )
        return cls(get_template(template_type, tokenizer), max_len)

    def render(self, request: RenderRequest) -> RenderedPrompt:
        if request.messages is not None:
            ids = self._chat_ids(list(request.messages))
        elif isinstance(request.prompt, str):
            ids = self.template.tokenize(request.prompt)
        else:
            ids = list(request.prompt or ())
        if not ids:
            raise InvalidRequestError("the prompt is empty.", param="prompt")
        return RenderedPrompt(
            tuple(ids), self._max_tokens(len(ids), request.max_tokens), tuple(self.template.stop_token_ids)
        )

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        from serve_app.template import messages_to_conversation

        system, history, query = messages_to_conversation(messages)
        ids, _ = self.template.encode(query, history, system)
        return ids

    def _max_tokens(self, prompt_len: int, asked: int | None) -> int:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise PromptTooLongError(prompt_len, self.max_model_len)
        if asked is not None and asked > room:
            raise InvalidRequestError(
                f"max_tokens={asked} does not fit: the prompt has {prompt_len} tokens and the context holds "
                f"{self.max_model_len}, so at most {room} tokens can be generated.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return asked if asked is not None else room
