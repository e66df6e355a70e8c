"""Turns engine deltas into OpenAI response bodies: chunks for SSE, whole objects otherwise.

Stream chunks are built as plain dicts (they are hot); their shape is that of the `openai`
package's `ChatCompletionChunk` / `Completion`, which the tests parse them with.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from serve_app.messages import Delta


@dataclass
class _Choice:
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)


class ResponseBuilder:
    """Accumulates one request's deltas; `kind` is "chat" or "completion"."""

    def __init__(self, kind: str, model: str, n: int, prompt_tokens: int, top_logprobs: int | None):
        self.kind, self.model = kind, model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens
        self.with_logprobs = top_logprobs is not None
        self.top = top_logprobs or 0
        self.choices = [_Choice() for _ in range(n)]
        self._role_sent = [False] * n
        self.messages = 0  # engine messages received (the ingress counts them into its metrics)

    def add_message(self, deltas: list[Delta]) -> None:
        """One engine message: its deltas, one per choice."""
        self.messages += 1
        for d in deltas:
            self.add(d)

    def add(self, delta: Delta) -> None:
        choice = self.choices[delta.index]
        choice.text += delta.text
        choice.tokens += len(delta.token_ids)
        choice.finish_reason = delta.finish_reason or choice.finish_reason
        if delta.logprobs:
            choice.logprobs.extend(delta.logprobs)

    @property
    def usage(self) -> dict:
        completion = sum(c.tokens for c in self.choices)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def chunk(self, delta: Delta) -> str:
        """The SSE event for one delta (after `add`)."""
        if self.kind == "chat":
            body = {"content": delta.text}
            if not self._role_sent[delta.index]:
                body = {"role": "assistant", **body}
                self._role_sent[delta.index] = True
            choice = {"index": delta.index, "delta": body, "finish_reason": delta.finish_reason}
            if self.with_logprobs:
                choice["logprobs"] = {"content": _chat_logprobs(delta.logprobs or (), self.top)}
        else:
            choice = {"index": delta.index, "text": delta.text, "finish_reason": delta.finish_reason}
            if self.with_logprobs:
                choice["logprobs"] = _completion_logprobs(delta.logprobs or (), self.top)
        return self._event({"choices": [choice]})

    def usage_chunk(self) -> str:
        return self._event({"choices": [], "usage": self.usage})

    def _event(self, body: dict) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        payload = {"id": self.id, "object": obj, "created": self.created, "model": self.model, **body}
        return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def final(self, echo_prefix: str = "") -> dict:
        """The whole non-streaming response."""
        choices = []
        for i, c in enumerate(self.choices):
            if self.kind == "chat":
                choice = {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason,
                }
                choice["logprobs"] = {"content": _chat_logprobs(c.logprobs, self.top)} if self.with_logprobs else None
            else:
                choice = {"index": i, "text": echo_prefix + c.text, "finish_reason": c.finish_reason}
                choice["logprobs"] = _completion_logprobs(c.logprobs, self.top) if self.with_logprobs else None
            choices.append(choice)
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage,
        }


def _chat_logprobs(items, top: int) -> list[dict]:
    return [
        {
            "token": lp.token,
            "logprob": lp.logprob,
            "bytes": list(lp.token.encode()),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp.top[:top]],
        }
        for lp in items
    ]


def _completion_logprobs(items, top: int) -> dict:
    return {
        "tokens": [lp.token for lp in items],
        "token_logprobs": [lp.logprob for lp in items],
        "top_logprobs": [dict(lp.top[:top]) for lp in items],
        "text_offset": [],
    }
