"""Tool calls in the formats of the served models: the schema that forces one, and the parser that
turns generated text into OpenAI's `tool_calls`.

- "hermes" (Qwen2/2.5, tiny-chat, many fine-tunes): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
- "llama3_json" (Llama 3.x): the reply is `{"name": ..., "parameters": {...}}`

`tool_choice: required` or a named function is enforced with structured outputs: for a tagged
format, an xgrammar structural tag (one or more `<tool_call>`-wrapped JSON objects, each matching a
call's schema); for a bare-JSON format, the JSON schema of a call. The model writes the tags itself,
so its tokens are the ones it was trained on, and the arguments always parse and match the
function's `parameters`. Parsers are our own: vLLM's are not a stable public API across the vLLM
versions lorafleet runs on.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from serve_app.errors import InvalidRequestError
from serve_app.messages import StructuredOutput


@dataclass(frozen=True)
class ToolCallFormat:
    name: str
    open_tag: str
    close_tag: str
    arguments_key: str


FORMATS = {
    "hermes": ToolCallFormat("hermes", "<tool_call>\n", "\n</tool_call>", "arguments"),
    "llama3_json": ToolCallFormat("llama3_json", "", "", "parameters"),
}


def call_schema(fmt: ToolCallFormat, tool: dict) -> dict:
    """JSON schema of one call to `tool`, as the format writes it."""
    function = tool["function"]
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "enum": [function["name"]]},
            fmt.arguments_key: function.get("parameters") or {"type": "object"},
        },
        "required": ["name", fmt.arguments_key],
        "additionalProperties": False,
    }


def forced_calls(fmt: ToolCallFormat, tools: tuple[dict, ...], only: str | None, single: bool) -> StructuredOutput:
    """The constraint that makes the reply a call to `only` (a named tool choice) or to any of
    `tools` (required): one call when `single`, else one or more."""
    schemas = [call_schema(fmt, t) for t in tools if only in (None, t["function"]["name"])]
    if not fmt.open_tag:
        return StructuredOutput(json=json.dumps(schemas[0] if len(schemas) == 1 else {"anyOf": schemas}))
    tags = [
        {
            "type": "tag",
            "begin": fmt.open_tag,
            "content": {"type": "json_schema", "json_schema": s},
            "end": fmt.close_tag,
        }
        for s in schemas
    ]
    calls = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True}
    return StructuredOutput(
        structural_tag=json.dumps({"type": "structural_tag", "format": calls | {"stop_after_first": single}})
    )


def _call(name: str, arguments) -> dict:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": text}}


def _as_call(obj, fmt: ToolCallFormat) -> dict | None:
    if isinstance(obj, dict) and isinstance(obj.get("name"), str) and fmt.arguments_key in obj:
        return _call(obj["name"], obj[fmt.arguments_key])
    return None


def parse_forced(fmt: ToolCallFormat, text: str) -> list[dict]:
    """The reply of a forced call: one JSON object (empty when it was cut off)."""
    try:
        call = _as_call(json.loads(text), fmt)
    except ValueError:
        return []
    return [call] if call else []


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_auto(fmt: ToolCallFormat, text: str) -> tuple[str | None, list[dict]]:
    """(content, calls) of a reply that may call tools; text that does not parse stays content."""
    content, calls = _split_calls(fmt, text)
    if calls:
        content = content.strip() or None
    return content, calls


def _split_calls(fmt: ToolCallFormat, text: str) -> tuple[str, list[dict]]:
    """(the text outside the calls, unstripped; calls)."""
    if fmt.name == "llama3_json":
        stripped = text.strip()
        try:
            call = _as_call(json.loads(stripped), fmt) if stripped.startswith("{") else None
        except ValueError:
            call = None
        return ("", [call]) if call else (text, [])
    calls, kept, end = [], [], 0
    for match in _HERMES.finditer(text):
        try:
            call = _as_call(json.loads(match.group(1)), fmt)
        except ValueError:
            call = None
        if call:
            kept.append(text[end : match.start()])
            end = match.end()
            calls.append(call)
    return "".join(kept) + text[end:], calls


class ToolCallStream:
    """Per choice: which text may stream as content now, held back while it may open a tool call.
    `single_call` keeps only the first call (parallel_tool_calls: false)."""

    def __init__(self, fmt: ToolCallFormat, forced: bool, single_call: bool = False):
        self.fmt, self.forced, self.single_call = fmt, forced, single_call
        self.text = ""
        self.sent = 0  # characters of `text` already streamed as content

    def feed(self, text: str) -> str:
        self.text += text
        if self.forced:
            return ""
        if self.fmt.name == "llama3_json":
            hold = self.text.lstrip().startswith("{") or not self.text.strip()
            return "" if hold else self._release(len(self.text))
        start = self.text.find("<tool_call>", self.sent)
        if start < 0:  # keep back a tail that could be the start of the tag
            start = len(self.text)
            for k in range(min(len("<tool_call>") - 1, len(self.text)), 0, -1):
                if "<tool_call>".startswith(self.text[-k:]):
                    start = len(self.text) - k
                    break
        return self._release(start)

    def _release(self, upto: int) -> str:
        out, self.sent = self.text[self.sent : max(upto, self.sent)], max(upto, self.sent)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content not yet streamed, calls) once the choice has ended."""
        _, calls = parse_reply(self.fmt, self.text, self.forced, self.single_call)
        if not calls:
            return self.text[self.sent :], []
        if self.forced:
            return "", calls
        # What was streamed is a prefix of the text outside the calls (nothing past a tag's start
        # goes out), so the rest is what follows it there; stripped as the whole reply's content is.
        outside, _ = _split_calls(self.fmt, self.text)
        rest = outside[self.sent :]
        return (rest.strip() if not self.sent else rest.rstrip()), calls


def parse_reply(fmt: ToolCallFormat, text: str, forced: bool, single_call: bool) -> tuple[str | None, list[dict]]:
    """(content, calls) of a whole reply; `single_call` keeps the first call only."""
    if forced and not fmt.open_tag:
        calls = parse_forced(fmt, text)
        return (None if calls else text), calls
    content, calls = parse_auto(fmt, text)
    if forced and calls:
        content = None
    return content, calls[:1] if single_call else calls


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request handles tools: the format to parse (None: no parsing), and for a forced
    call the output constraint."""

    format: ToolCallFormat | None = None
    forced: bool = False
    structured: StructuredOutput | None = None
    single_call: bool = False  # parallel_tool_calls: false; a forced call is always one

    @classmethod
    def for_request(cls, req, model) -> ToolPlan:
        mode = req.tool_mode
        if mode == "none":
            return cls()
        if model.tool_format is None:
            raise InvalidRequestError(
                f"model '{req.model}' has no tool-call format configured, so its tool calls cannot be parsed; "
                "set tool_call_format (hermes or llama3_json) in its model config, or send tool_choice 'none'.",
                param="tools",
            )
        fmt = FORMATS[model.tool_format]
        if mode == "auto":
            return cls(format=fmt, single_call=req.parallel_tool_calls is False)
        if req.structured_output() is not None:
            raise InvalidRequestError(
                "a forced tool call (tool_choice 'required' or a named function) cannot be combined with "
                "`response_format` or `structured_outputs`.",
                param="tool_choice",
            )
        only = req.tool_choice.name if mode == "named" else None
        single = mode == "named" or req.parallel_tool_calls is False
        return cls(format=fmt, forced=True, structured=forced_calls(fmt, req.tool_dicts(), only, single))
