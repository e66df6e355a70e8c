"""Chat templates: (system, history, query) -> prompt text and token ids.

Each template with an official Hugging Face chat template renders exactly what
`tokenizer.apply_chat_template` renders for the same conversation (tests/unit/test_template.py).
History is a list of [query, response] pairs, as in ms-swift.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from serve_app.errors import InvalidRequestError, PromptTooLongError

History = list[list[str]]

QWEN_SYSTEM = "You are a helpful assistant."
LLAMA2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe."
)


@dataclass
class Template:
    """Renders a conversation for one model family; `tokenizer` supplies bos/eos and encoding."""

    template_type: str
    tokenizer: Any
    default_system: str | None = None
    stop_words: list[str] = field(default_factory=list)
    supports_system: bool = True
    supports_history: bool = True

    def render(self, query: str, history: History | None = None, system: str | None = None) -> str:
        """The prompt text the model continues, ending where the response starts."""
        history = _check_history(history)
        if system is None:
            system = self.default_system
        if system and not self.supports_system:
            raise InvalidRequestError(f"template '{self.template_type}' has no system prompt; drop `system`.")
        if history and not self.supports_history:
            raise InvalidRequestError(f"template '{self.template_type}' has no chat history; drop `history`.")
        return self._render(system or None, history, query)

    def encode(
        self,
        query: str,
        history: History | None = None,
        system: str | None = None,
        max_length: int | None = None,
    ) -> tuple[list[int], History]:
        """Token ids of the prompt and the history actually used.

        When the prompt exceeds `max_length` tokens the oldest turns are dropped first; if the
        query alone does not fit, PromptTooLongError names both counts.
        """
        history = list(_check_history(history))
        while True:
            ids = self.tokenize(self.render(query, history, system))
            if max_length is None or len(ids) <= max_length:
                return ids, history
            if not history:
                raise PromptTooLongError(len(ids), max_length)
            history.pop(0)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids of stop words that are single tokens (end-of-turn markers)."""
        ids = []
        for word in self.stop_words:
            token_id = self.tokenizer.convert_tokens_to_ids(word)
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id:
                ids.append(token_id)
        return ids

    def _render(self, system: str | None, history: History, query: str) -> str:
        raise NotImplementedError


class ChatMLTemplate(Template):
    """`<|im_start|>role\\ncontent<|im_end|>\\n` turns (Qwen, Yi)."""

    def _render(self, system, history, query):
        parts = [f"<|im_start|>system\n{system}<|im_end|>\n"] if system else []
        for q, r in history:
            parts.append(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{r}<|im_end|>\n")
        parts.append(f"<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n")
        return "".join(parts)


class Llama2Template(Template):
    """`<s>[INST] <<SYS>>...<</SYS>> q [/INST] r </s>` (Llama-2 chat)."""

    def _render(self, system, history, query):
        bos, eos = self.tokenizer.bos_token or "", self.tokenizer.eos_token or ""
        parts = []
        for i, (q, r) in enumerate([*history, [query, None]]):
            if i == 0 and system:
                q = f"<<SYS>>\n{system}\n<</SYS>>\n\n{q}"
            parts.append(f"{bos}[INST] {q.strip()} [/INST]")
            if r is not None:
                parts.append(f" {r.strip()} {eos}")
        return "".join(parts)


class Llama3Template(Template):
    """`<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>` (Llama-3 instruct)."""

    def _render(self, system, history, query):
        def turn(role, content):
            return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>"

        parts = [self.tokenizer.bos_token or ""]
        if system:
            parts.append(turn("system", system))
        for q, r in history:
            parts += [turn("user", q), turn("assistant", r)]
        parts += [turn("user", query), "<|start_header_id|>assistant<|end_header_id|>\n\n"]
        return "".join(parts)


class ChatGLM3Template(Template):
    """`[gMASK]sop<|user|>\\n q<|assistant|>\\n r` (ChatGLM3)."""

    def _render(self, system, history, query):
        parts = ["[gMASK]sop"]
        if system:
            parts.append(f"<|system|>\n {system}")
        for q, r in history:
            parts.append(f"<|user|>\n {q}<|assistant|>\n {r}")
        parts.append(f"<|user|>\n {query}<|assistant|>")
        return "".join(parts)


class GenerationTemplate(Template):
    """Base (non-chat) models: the prompt is the query itself."""

    def _render(self, system, history, query):
        return query


class JinjaTemplate(Template):
    """Uses the tokenizer's own `chat_template` (any local checkpoint that ships one)."""

    @property
    def stop_token_ids(self) -> list[int]:
        """The checkpoint's end-of-sequence token ends the turn (its template has no stop words here)."""
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return [eos] if isinstance(eos, int) else []

    def _render(self, system, history, query):
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(
                "template 'jinja' needs a tokenizer with a chat_template; pick a template_type instead."
            )
        messages = conversation_to_messages(system, history, query)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def template_messages(messages) -> list[dict]:
    """OpenAI messages as Hugging Face chat templates expect them: a tool call's `arguments` is a
    JSON object there, JSON text in OpenAI's API (text that is not JSON stays text)."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [_parsed_arguments(call) for call in message["tool_calls"]]
        out.append(message)
    return out


def _parsed_arguments(call: dict) -> dict:
    function = dict(call.get("function", call))
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except ValueError:
            pass
    return {**call, "function": function} if "function" in call else function


def conversation_to_messages(system: str | None, history: History, query: str) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    for q, r in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    return messages + [{"role": "user", "content": query}]


def messages_to_conversation(messages: list[dict]) -> tuple[str | None, History, str]:
    """OpenAI-style messages -> (system, history, query); the last message must be the user's."""
    if not messages:
        raise InvalidRequestError("`messages` must not be empty.", param="messages")
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    if not messages or messages[-1]["role"] != "user":
        raise InvalidRequestError("the last message must have role 'user'.", param="messages")
    history: History = []
    for i in range(0, len(messages) - 1, 2):
        user, assistant = messages[i], messages[i + 1]
        if user["role"] != "user" or assistant["role"] != "assistant":
            raise InvalidRequestError(
                "after an optional system message, roles must alternate user/assistant.", param="messages"
            )
        history.append([user["content"], assistant["content"]])
    return system, history, messages[-1]["content"]


def _check_history(history) -> History:
    history = history or []
    for turn in history:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(x, str) for x in turn)):
            raise InvalidRequestError("history must be a list of [query, response] string pairs.", param="history")
    return [list(turn) for turn in history]


_TEMPLATES = {
    "qwen": (ChatMLTemplate, dict(default_system=QWEN_SYSTEM, stop_words=["<|im_end|>", "<|endoftext|>"])),
    "chatml": (ChatMLTemplate, dict(stop_words=["<|im_end|>", "<|endoftext|>"])),
    "llama": (Llama2Template, dict(default_system=LLAMA2_SYSTEM, stop_words=["</s>"])),
    "llama3": (Llama3Template, dict(stop_words=["<|eot_id|>", "<|end_of_text|>"])),
    "chatglm3": (ChatGLM3Template, dict(stop_words=["<|user|>", "<|observation|>"])),
    "default-generation": (GenerationTemplate, dict(supports_system=False, supports_history=False)),
    "jinja": (JinjaTemplate, dict()),
}


class TemplateType:
    """Constants for `get_template`, as in ms-swift."""

    qwen = "qwen"
    chatml = "chatml"
    llama = "llama"
    llama3 = "llama3"
    chatglm3 = "chatglm3"
    default_generation = "default-generation"
    jinja = "jinja"


def known_template_types() -> list[str]:
    return sorted(_TEMPLATES)


def get_template(template_type: str, tokenizer: Any, default_system: str | None = None, **_: Any) -> Template:
    """The template named `template_type`, bound to `tokenizer`."""
    if template_type not in _TEMPLATES:
        raise InvalidRequestError(
            f"unknown template_type '{template_type}'; choose one of {sorted(_TEMPLATES)}.", param="template_type"
        )
    cls, options = _TEMPLATES[template_type]
    options = dict(options)
    if default_system is not None:
        options["default_system"] = default_system
    return cls(template_type=template_type, tokenizer=tokenizer, **options)
