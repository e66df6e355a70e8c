"""Client helpers as in ms-swift, on the official `openai` client.

    model_list = get_model_list_client()
    resp = inference_client(model_list.data[0].id, "浙江的省会在哪里？", request_config=XRequestConfig(seed=42))
    print(resp.choices[0].message.content)

Chat models get `/v1/chat/completions` with (system, history, query) as messages; generation
models get `/v1/completions` with the query as the prompt. Results are the openai package's objects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from serve_app.template import conversation_to_messages

_VLLM_EXTRAS = ("top_k", "repetition_penalty", "min_p", "min_tokens", "ignore_eos", "stop_token_ids")


@dataclass
class XRequestConfig:
    """Sampling settings of one request (None: the server's default)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    n: int = 1
    seed: int | None = None
    stop: list[str] | None = None
    stream: bool = False
    logprobs: bool = False
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def kwargs(self, chat: bool) -> dict:
        values = {k: v for k, v in asdict(self).items() if v is not None}
        extra = {k: values.pop(k) for k in _VLLM_EXTRAS if k in values}
        if not values.get("logprobs"):
            values.pop("logprobs", None)
        elif not chat:
            values["logprobs"] = values.pop("top_logprobs", 0)
        if extra:
            values["extra_body"] = extra
        return values


def _base_url(host: str, port: int) -> str:
    return f"http://{host}:{port}/v1"


def _client(host: str, port: int, api_key: str | None, is_async: bool = False):
    from openai import AsyncOpenAI, OpenAI

    cls = AsyncOpenAI if is_async else OpenAI
    return cls(base_url=_base_url(host, port), api_key=api_key or "EMPTY")


def get_model_list_client(host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, **unsupported: Any):
    """The served models and adapters (`.data[i].id`)."""
    _refuse(unsupported)
    return _client(host, port, api_key).models.list()


def inference_client(
    model_type: str,
    query: str,
    history: list | None = None,
    system: str | None = None,
    *,
    request_config: XRequestConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    is_chat_request: bool | None = None,
    **unsupported: Any,
):
    """One request; a ChatCompletion/Completion, or an iterator of chunks when streaming."""
    _refuse(unsupported)
    client = _client(host, port, api_key)
    if is_chat_request is None:
        is_chat_request = _is_chat(client.models.retrieve(model_type))
    create, kwargs = _request(client, model_type, query, history, system, request_config, is_chat_request)
    return create(**kwargs)


async def inference_client_async(
    model_type: str,
    query: str,
    history: list | None = None,
    system: str | None = None,
    *,
    request_config: XRequestConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    is_chat_request: bool | None = None,
    **unsupported: Any,
):
    """`inference_client` for asyncio; a stream is an async iterator of chunks."""
    _refuse(unsupported)
    client = _client(host, port, api_key, is_async=True)
    if is_chat_request is None:
        is_chat_request = _is_chat(await client.models.retrieve(model_type))
    create, kwargs = _request(client, model_type, query, history, system, request_config, is_chat_request)
    return await create(**kwargs)


def _refuse(unsupported: dict) -> None:
    """ms-swift's other arguments (images, a misspelt port) are refused by name, not dropped; one
    given empty (None, [], False: code written for ms-swift's signature) means "not used" and passes."""
    if given := sorted(k for k, v in unsupported.items() if v not in (None, False, [], (), {}, "")):
        raise TypeError(f"lorafleet's client helpers take no argument named {', '.join(given)}.")


def _request(client, model_type, query, history, system, config: XRequestConfig | None, chat: bool):
    """The client's create method for the model's kind, and its arguments (sync or async client)."""
    options = (config or XRequestConfig()).kwargs(chat=chat)
    if chat:
        messages = conversation_to_messages(system, [list(t) for t in history or []], query)
        return client.chat.completions.create, dict(model=model_type, messages=messages, **options)
    return client.completions.create, dict(model=model_type, prompt=query, **options)


def _is_chat(card) -> bool:
    extra = getattr(card, "model_extra", None) or {}
    return extra.get("is_chat", True)
