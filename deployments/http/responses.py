"""Turns engine deltas into OpenAI response bodies: chunks for SSE, whole objects otherwise.

Stream chunks are built as plain dicts (they are hot); their shape is that of the `openai`
package's `ChatCompletionChunk` / `Completion`, which the tests parse them with.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from deployments.http.tool_calls import ToolCallFormat, ToolCallStream, parse_reply
from serve_app.messages import Delta, TokenLogprob


def _tool_finish(engine_finish: str | None) -> str:
    """A reply with tool calls ends in "tool_calls", unless the token limit cut it: then "length",
    as OpenAI says, so that a client knows a call may be missing or unfinished."""
    return "length" if engine_finish == "length" else "tool_calls"


@dataclass
class _Choice:
    text: str = ""
    token_ids: list = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)
    tools: ToolCallStream | None = None


@dataclass(frozen=True)
class ResponseOptions:
    """What the request asked to see beyond the text."""

    top_logprobs: int | None = None  # None: no logprobs
    tool_format: ToolCallFormat | None = None  # parse tool calls in this format
    forced_tool_call: bool = False  # the reply is the JSON of one call (tool_choice required/named)
    single_tool_call: bool = False  # parallel_tool_calls: false
    return_token_ids: bool = False
    continuous_usage: bool = False
    echo: tuple[str, ...] = ()  # completions: the prompt text per prompt, to put before each choice
    n: int = 1  # choices per prompt


class ResponseBuilder:
    """Accumulates one request's deltas; `kind` is "chat" or "completion"."""

    def __init__(self, kind: str, model: str, choices: int, prompt_ids: list, options: ResponseOptions):
        self.kind, self.model, self.options = kind, model, options
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.prompt_ids = prompt_ids  # one id list per prompt
        self.prompt_logprobs: dict[int, tuple] = {}
        self.with_logprobs = options.top_logprobs is not None
        self.top = options.top_logprobs or 0
        self.choices = [_Choice() for _ in range(choices)]
        if options.tool_format:
            for c in self.choices:
                c.tools = ToolCallStream(options.tool_format, options.forced_tool_call, options.single_tool_call)
        self._role_sent = [False] * choices
        self._first_chunk = True
        self.messages = 0  # engine messages received (the ingress counts them into its metrics)

    def add_message(self, deltas: list[Delta]) -> None:
        """One engine message: its deltas, one per choice."""
        self.messages += 1
        for d in deltas:
            self.add(d)

    def add(self, delta: Delta) -> None:
        choice = self.choices[delta.index]
        choice.text += delta.text
        choice.token_ids.extend(delta.token_ids)
        choice.finish_reason = delta.finish_reason or choice.finish_reason
        if delta.logprobs:
            choice.logprobs.extend(delta.logprobs)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs[delta.index // self.options.n] = delta.prompt_logprobs

    @property
    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompt_ids)
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # --- streaming --------------------------------------------------------------------------

    def chunk(self, delta: Delta) -> str:
        """The SSE event for one delta (after `add`)."""
        if self.kind == "chat":
            choice = self._chat_chunk_choice(delta)
            if choice is None:
                return ""
        else:
            choice = {"index": delta.index, "text": delta.text, "finish_reason": delta.finish_reason}
            if self.with_logprobs:
                choice["logprobs"] = self._completion_logprobs(delta.logprobs or (), offset=self._offset(delta))
        if self.options.return_token_ids:
            choice["token_ids"] = list(delta.token_ids)
        body = {"choices": [choice]}
        if self._first_chunk and self.options.return_token_ids and self.kind == "chat":
            body["prompt_token_ids"] = self.prompt_ids[0]
        self._first_chunk = False
        if self.options.continuous_usage:
            body["usage"] = self.usage
        return self._event(body)

    def _chat_chunk_choice(self, delta: Delta) -> dict | None:
        choice = self.choices[delta.index]
        body, finish = {"content": delta.text}, delta.finish_reason
        if choice.tools:
            body["content"] = choice.tools.feed(delta.text)
            if finish:
                rest, calls = choice.tools.finish()
                body["content"] += rest
                if calls:
                    body["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
                    finish = _tool_finish(finish)
            if not body["content"] and not finish and not delta.logprobs and not self.options.return_token_ids:
                return None  # held back: it may be part of a tool call
        if not self._role_sent[delta.index]:
            body = {"role": "assistant", **body}
            self._role_sent[delta.index] = True
        out = {"index": delta.index, "delta": body, "finish_reason": finish}
        if self.with_logprobs:
            out["logprobs"] = {"content": _chat_logprobs(delta.logprobs or (), self.top)}
        return out

    def usage_chunk(self) -> str:
        return self._event({"choices": [], "usage": self.usage})

    def _event(self, body: dict) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        payload = {"id": self.id, "object": obj, "created": self.created, "model": self.model, **body}
        return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"

    # --- whole responses --------------------------------------------------------------------

    def final(self) -> dict:
        """The whole non-streaming response."""
        choices = [self._final_choice(i, c) for i, c in enumerate(self.choices)]
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        body["usage"] = self.usage
        if self.options.return_token_ids and self.kind == "chat":
            body["prompt_token_ids"] = self.prompt_ids[0]
        if self.prompt_logprobs and self.kind == "chat":
            body["prompt_logprobs"] = list(self.prompt_logprobs.get(0, ()))
        return body

    def _final_choice(self, i: int, c: _Choice) -> dict:
        if self.kind == "chat":
            message, finish = {"role": "assistant", "content": c.text}, c.finish_reason
            if c.tools:
                o = self.options
                content, calls = parse_reply(o.tool_format, c.text, o.forced_tool_call, o.single_tool_call)
                message["content"] = content
                if calls:
                    message["tool_calls"] = calls
                    finish = _tool_finish(finish)
            choice = {"index": i, "message": message, "finish_reason": finish}
            choice["logprobs"] = {"content": _chat_logprobs(c.logprobs, self.top)} if self.with_logprobs else None
        else:
            prompt = i // self.options.n
            echo = self.options.echo[prompt] if self.options.echo else ""
            choice = {"index": i, "text": echo + c.text, "finish_reason": c.finish_reason}
            choice["logprobs"] = self._final_completion_logprobs(prompt, c) if self.with_logprobs else None
            if prompt in self.prompt_logprobs and not echo:
                choice["prompt_logprobs"] = list(self.prompt_logprobs[prompt])
        if self.options.return_token_ids:
            choice["token_ids"] = c.token_ids
            if self.kind == "completion":  # vLLM's shape: each choice names its prompt's ids
                choice["prompt_token_ids"] = self.prompt_ids[i // self.options.n]
        return choice

    def _final_completion_logprobs(self, prompt: int, c: _Choice) -> dict:
        if not self.options.echo:
            return self._completion_logprobs(c.logprobs, offset=0)
        echoed = _prompt_token_logprobs(self.prompt_ids[prompt], self.prompt_logprobs.get(prompt, ()))
        if echoed:  # the first token has no logprob entry; its text is what the others leave of the prompt
            rest = "".join(lp.token for lp in echoed[1:])
            text = self.options.echo[prompt]
            echoed[0] = TokenLogprob(token=text[: len(text) - len(rest)] if text.endswith(rest) else "", logprob=None)
        return self._completion_logprobs([*echoed, *c.logprobs], offset=0)

    def _offset(self, delta: Delta) -> int:
        """Characters of this choice's text before `delta` (its tokens' text offsets start there)."""
        choice = self.choices[delta.index]
        return len(choice.text) - len(delta.text)

    def _completion_logprobs(self, items, offset: int) -> dict:
        offsets = []
        for lp in items:
            offsets.append(offset)
            offset += len(lp.token) if lp else 0
        return {
            "tokens": [lp.token if lp else None for lp in items],
            "token_logprobs": [lp.logprob if lp and lp.logprob is not None else None for lp in items],
            # The sampled token is always there, as OpenAI returns it, even for logprobs=0.
            "top_logprobs": [
                ({lp.token: lp.logprob, **dict(lp.top[: self.top])} if lp and lp.logprob is not None else None)
                for lp in items
            ],
            "text_offset": offsets,
        }


def _prompt_token_logprobs(prompt_ids, prompt_logprobs) -> list[TokenLogprob]:
    """The prompt's tokens as completion logprob items; the first has no logprob (None), as in OpenAI."""
    items = []
    for i, token_id in enumerate(prompt_ids):
        entry = prompt_logprobs[i] if i < len(prompt_logprobs) else None
        if not entry:
            items.append(TokenLogprob(token="", logprob=None))
            continue
        own = entry.get(str(token_id), {})
        others = sorted(entry.values(), key=lambda v: v["rank"])
        items.append(
            TokenLogprob(
                token=own.get("decoded_token") or "",
                logprob=own.get("logprob"),
                top=tuple((v["decoded_token"] or "", v["logprob"]) for v in others),
            )
        )
    return items


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
