"""The messages that cross deployments: frozen dataclasses of plain values, so they pickle across Ray.

Ingress ──RenderRequest──▶ Renderer ──RenderedPrompt──▶ Ingress
Ingress ──GenerationRequest──▶ LLMServer ──FirstMessage, then list[Delta]──▶ Ingress
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterRef:
    """An adapter as an engine sees it. A new `adapter_id` means new weights, even for the same name."""

    name: str
    adapter_id: int
    path: str  # a local folder, or a URL that the engine replica downloads first (remote_sources.py)
    checksum: str | None = None  # of a URL's files


@dataclass(frozen=True)
class StructuredOutput:
    """One constraint on the output (vLLM's structured outputs); a JSON schema travels as JSON text."""

    json: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: str | None = None  # xgrammar's structural tag, as JSON text


@dataclass(frozen=True)
class SamplingOptions:
    """Engine-neutral sampling settings; `max_tokens=None` means what is left of the context."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    include_stop_str_in_output: bool = False
    structured: StructuredOutput | None = None
    prompt_logprobs: int | None = None
    priority: int = 0


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float | None  # None: the first prompt token (nothing before it to predict it from)
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """New output of choice `index` since the previous delta; `finish_reason` is set on its last one."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    # On the first delta of choice 0 when asked for: per prompt token None (the first) or
    # {token id as text: {"logprob", "rank", "decoded_token"}}, vLLM's JSON shape.
    prompt_logprobs: tuple[dict | None, ...] | None = None


@dataclass(frozen=True)
class ServedBy:
    """Which engine replica took a request and where its adapter stood there, for the ingress' metrics.

    `adapter` is "base" (no adapter), "resident" (already loaded on that replica) or "loaded"
    (this request waited for it to load there): affinity routing shows as few "loaded".
    `first_token_s` is the time on the replica from taking the request to the engine's first token
    (adapter load, engine queue and prefill): the ingress's time to first token minus this and the
    render call is what the hops between deployments cost.
    """

    replica: str
    adapter: str
    first_token_s: float


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    options: SamplingOptions
    adapter: AdapterRef | None = None


@dataclass(frozen=True)
class FirstMessage:
    """The first message of every LLMServer stream: who served it, and the first deltas. Every later
    message is a plain `list[Delta]`."""

    served_by: ServedBy
    deltas: list[Delta]


@dataclass(frozen=True)
class RenderRequest:
    """Either `messages` (chat, OpenAI's message dicts with text content) or `prompt` (raw completion
    text or token ids)."""

    model: str
    messages: tuple | None = None
    prompt: str | tuple[int, ...] | None = None
    max_tokens: int | None = None
    tools: tuple[dict, ...] = ()
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    truncate_prompt_tokens: int | None = None
    return_text: bool = False  # send the prompt's text back (completions' echo)
    adapter: AdapterRef | None = None  # an adapter folder that ships its own chat template renders with it

    def size_chars(self) -> int:
        """The characters of text in the messages and tools (a token id counts as one), for choosing
        where it renders: a walk over the values, no copy of the text."""
        if self.messages is None:
            return len(self.prompt or ())
        return _text_chars(self.messages) + _text_chars(self.tools)


def _text_chars(value) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_chars(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_text_chars(v) for v in value)
    return 0


@dataclass(frozen=True)
class RenderedPrompt:
    prompt_ids: tuple[int, ...]
    max_tokens: int  # what the request may generate: asked for, or what is left of the context
    stop_token_ids: tuple[int, ...]
    text: str = ""  # the prompt's text, when the request asked for it
    render_s: float = 0.0  # the renderer's own work on it; the rest of the render call is the hop
