"""OpenAI request bodies (pydantic, validated at the HTTP edge) and their sampling options.

Every field of the `openai` package's request params is declared here, refused by name
(`REFUSED`), or accepted and ignored for a reason README lists (`IGNORED`); anything else is
refused as unknown. tests/unit/test_openai_fields.py enumerates the package's own parameter types
so that a field added to OpenAI's API cannot slip through. vLLM's extra fields travel in the
openai client's `extra_body`.
"""

from __future__ import annotations

import functools
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.errors import InvalidRequestError
from serve_app.messages import SamplingOptions, StructuredOutput

MAX_N = 16
MAX_LOGPROBS = 20
MAX_PROMPT_LOGPROBS = 20
TokenId = Annotated[int, Field(ge=0)]

# OpenAI fields accepted and not acted on, and why (README's "OpenAI fields" table says the same).
IGNORED = {
    "user": "an end-user id for OpenAI's abuse monitoring; lorafleet keeps no per-user state",
    "metadata": "tags for OpenAI's stored completions; nothing is stored",
    "safety_identifier": "an end-user id for OpenAI's abuse monitoring",
    "prompt_cache_key": "prefix caching needs no key: the engine shares equal prefixes by itself",
    "prompt_cache_retention": "cached prefixes live as long as the engine has room for them",
    "service_tier": "one tier: every request is served the same way",
}
# OpenAI fields refused with a 400 that names them, and why.
REFUSED = {
    "functions": "deprecated by OpenAI; send `tools`",
    "function_call": "deprecated by OpenAI; send `tool_choice`",
    "audio": "the served models are text-only",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "the served models have no reasoning setting",
    "verbosity": "the served models have no verbosity setting",
    "web_search_options": "there is no web search",
    "moderation": "there is no moderation endpoint behind this server",
    "prompt_cache_options": "prefix caching is automatic and takes no options",
    "suffix": "insertion (text after the completion) is not supported",
    # vLLM's former guided-decoding fields (removed from vLLM's server too)
    "guided_json": 'send `response_format` or `structured_outputs: {"json": ...}`',
    "guided_regex": 'send `structured_outputs: {"regex": ...}`',
    "guided_choice": 'send `structured_outputs: {"choice": [...]}`',
    "guided_grammar": 'send `structured_outputs: {"grammar": ...}`',
    "guided_decoding_backend": "the engine's structured-output backend is set at engine start",
    "guided_whitespace_pattern": "the structured-output backend (xgrammar) takes no whitespace pattern",
    # read by vLLM per engine, not per request: accepting them would change nothing
    "disable_any_whitespace": "xgrammar reads it per engine: engine_kwargs "
    "{structured_outputs_config: {disable_any_whitespace: true}}",
    "whitespace_pattern": "the structured-output backend (xgrammar) takes no whitespace pattern",
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _refuse_by_name(cls, data):
        """A field OpenAI or vLLM defines that lorafleet does not act on gets its own reason. A null
        field means "not given" in OpenAI's API (the openai client sends `"n": null` for `n=None`,
        and a message sent back whole carries `"audio": null`): it takes the field's default."""
        if not isinstance(data, dict):
            return data
        for name, value in data.items():
            if name in REFUSED and name not in cls.model_fields and value is not None:
                raise InvalidRequestError(f"`{name}` is not supported: {REFUSED[name]}.", param=name)
        return {k: v for k, v in data.items() if v is not None}


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage in every chunk


class JsonSchemaFormat(Strict):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _a_json_schema(cls, schema: dict) -> dict:
        return checked_schema(schema)


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a `json_schema` object with a `schema`")
        return self


class StructuredOutputs(Strict):
    """vLLM's `structured_outputs` extra: exactly one constraint."""

    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: dict | str | None = None

    @field_validator("json_")
    @classmethod
    def _a_json_schema(cls, schema: dict | str | None):
        """A schema, as an object or as its JSON text (which goes on as given, once checked)."""
        parsed = schema
        if isinstance(schema, str):
            try:
                parsed = json.loads(schema)
            except ValueError as e:
                raise ValueError(f"not JSON: {e}") from None
            if not isinstance(parsed, (dict, bool)):
                raise ValueError("a JSON Schema is an object (or true / false)")
        if isinstance(parsed, dict):
            checked_schema(parsed)
        return schema

    @model_validator(mode="after")
    def _one_kind(self):
        if self.json_object is False:  # "no JSON-object constraint": not a constraint of its own
            self.json_object = None
        kinds = ("json_", "regex", "choice", "grammar", "json_object", "structural_tag")
        if len([k for k in kinds if getattr(self, k) is not None]) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object, structural_tag")
        return self

    def spec(self) -> StructuredOutput:
        def text(value):
            return json.dumps(value) if isinstance(value, dict) else value

        return StructuredOutput(
            json=text(self.json_),
            regex=self.regex,
            choice=tuple(self.choice) if self.choice else None,
            grammar=self.grammar,
            json_object=bool(self.json_object),
            structural_tag=text(self.structural_tag),
        )


class SamplingFields(Strict):
    """Sampling fields common to chat and completions, including vLLM's extras."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="omitted: the model's default")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description="token id (as text) -> bias in [-100, 100]")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras (openai client: extra_body={...})
    top_k: int | None = Field(None, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputs | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_PROMPT_LOGPROBS)
    return_token_ids: bool = False
    truncate_prompt_tokens: int | None = Field(None, ge=1, description="keep the last k prompt tokens")
    priority: int = Field(0, description="lower runs first; needs an engine started with priority scheduling")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias_by_token_id(cls, v):
        for token, bias in (v or {}).items():
            if not token.isdigit():
                raise ValueError(f"keys are token ids written as text; got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases lie in [-100, 100]; got {bias} for token {token}")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("`stream_options` is only allowed when `stream` is true.", param="stream_options")
        if self.prompt_logprobs is not None and self.stream:
            raise InvalidRequestError("`prompt_logprobs` is not returned when streaming.", param="prompt_logprobs")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def structured_output(self) -> StructuredOutput | None:
        return self.structured_outputs.spec() if self.structured_outputs else None

    def check_n(self, defaults: dict) -> float:
        """The temperature, once `n` is known to be answerable with it (checked before the request
        is admitted, so a refused one does not count against a tenant's limits)."""
        temperature = self.temperature if self.temperature is not None else defaults.get("temperature", 1.0)
        if self.n > 1 and temperature == 0:
            why = "the request's temperature is 0" if self.temperature is not None else "this model's default is greedy"
            raise InvalidRequestError(
                f"n={self.n} asks for different answers, but {why}; send a temperature above 0 (OpenAI's default is 1).",
                param="n",
            )
        return temperature

    def sampling_options(
        self,
        max_tokens: int,
        stop_token_ids: tuple[int, ...],
        logprobs: int | None,
        defaults: dict,
        structured: StructuredOutput | None = None,
    ) -> SamplingOptions:
        """Fields the request omits take the model's defaults (`defaults`), then OpenAI's."""

        def pick(name: str, fallback):
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, fallback)

        temperature = self.check_n(defaults)
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=pick("top_p", 1.0),
            top_k=max(pick("top_k", 0), 0),
            min_p=self.min_p,
            repetition_penalty=pick("repetition_penalty", 1.0),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            stop=tuple(self.stop or ()),
            # ignore_eos also ignores the template's end-of-turn tokens (a chat model's EOS), as
            # vLLM's server does; stop_token_ids the client sent still apply.
            stop_token_ids=(() if self.ignore_eos else tuple(stop_token_ids)) + tuple(self.stop_token_ids or ()),
            seed=self.seed,
            n=self.n,
            logprobs=logprobs,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            logit_bias=tuple((int(t), b) for t, b in (self.logit_bias or {}).items()),
            include_stop_str_in_output=self.include_stop_str_in_output,
            structured=structured,
            prompt_logprobs=self.prompt_logprobs,
            priority=self.priority,
        )


class FunctionCall(Strict):
    name: str = Field(min_length=1)
    arguments: str


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    name: str | None = Field(None, description="accepted; chat templates here have no speaker names")
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None  # an assistant message sent back as the API returned it
    annotations: list | None = Field(None, description="accepted, ignored: citations of OpenAI's web search")

    @model_validator(mode="after")
    def _shape(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a '{self.role}' message needs `content`")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry `tool_calls`")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs the `tool_call_id` it answers")
        for part in self.content if isinstance(self.content, list) else ():
            if part.get("type") != "text":
                raise InvalidRequestError(
                    f"content part type '{part.get('type')}' is not supported: the served models are text-only.",
                    param="messages.content",
                    code="unsupported_content_part",
                )
            if set(part) != {"type", "text"} or not isinstance(part["text"], str):
                raise ValueError('a text content part is {"type": "text", "text": <string>}')
        return self

    def text(self) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "".join(part["text"] for part in self.content)

    def plain(self) -> dict:
        """The message as the renderer takes it: text content, OpenAI's tool fields kept."""
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDefinition(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _a_json_schema(cls, schema: dict) -> dict:
        return checked_schema(schema)


def checked_schema(schema: dict) -> dict:
    """A schema checked against JSON Schema's meta-schema (tools' parameters, response_format's and
    structured_outputs' schemas): the engine's grammar compiler would refuse a bad one later with a
    message about its own grammar, naming no field."""
    if problem := _schema_problem(json.dumps(schema, sort_keys=True)):
        raise ValueError(f"not a valid JSON Schema: {problem}")
    return schema


@functools.lru_cache(maxsize=1024)  # agents send the same tools with every turn; a check takes ms
def _schema_problem(schema_json: str) -> str | None:
    import jsonschema

    schema = json.loads(schema_json)
    if not isinstance(schema.get("$schema", ""), str):
        return "`$schema` must be a string, the URI of a meta-schema"
    try:
        validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        # no format checks: Python's `re` would refuse ECMA-262 patterns (\p{L}, (?<name>)) that
        # OpenAI and the engine's grammar compiler take
        validator.check_schema(schema, format_checker=None)
    except jsonschema.SchemaError as e:
        return e.message
    except Exception as e:  # noqa: BLE001  a schema jsonschema cannot even walk is not valid either
        return f"{type(e).__name__}: {e}"
    return None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: dict[str, str]

    @property
    def name(self) -> str:
        return self.function.get("name", "")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = Field(None, description="only false: nothing is stored")
    modalities: list[Literal["text"]] | None = None
    # accepted and ignored (IGNORED says why)
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    service_tier: str | None = None
    # vLLM extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("`top_logprobs` needs `logprobs: true`.", param="top_logprobs")
        if self.store:
            raise InvalidRequestError("`store: true` is not supported: completions are not stored.", param="store")
        if self.response_format and self.response_format.type != "text" and self.structured_outputs:
            raise InvalidRequestError(
                "send either `response_format` or `structured_outputs`, not both.", param="structured_outputs"
            )
        if self.tool_choice not in (None, "none") and not self.tools:
            raise InvalidRequestError("`tool_choice` needs `tools`.", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or ()]
            if self.tool_choice.name not in names:
                raise InvalidRequestError(
                    f"tool_choice names function '{self.tool_choice.name}', which is not in `tools` {names}.",
                    param="tool_choice",
                )
        if (
            self.continue_final_message
            and self.add_generation_prompt
            and "add_generation_prompt" in self.model_fields_set
        ):
            raise InvalidRequestError(
                "`continue_final_message` and `add_generation_prompt` cannot both be true.",
                param="continue_final_message",
            )
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise InvalidRequestError(
                "`continue_final_message` needs a final assistant message to continue.",
                param="continue_final_message",
            )
        return self

    def plain_messages(self) -> tuple[dict, ...]:
        return tuple(m.plain() for m in self.messages)

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def tool_mode(self) -> str:
        """ "none", "auto", "required" or "named": how tool calls are asked for and parsed."""
        if not self.tools:
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def tool_dicts(self) -> tuple[dict, ...]:
        return tool_dicts(self.tools)

    def structured_output(self) -> StructuredOutput | None:
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return super().structured_output()
        if fmt.type == "json_object":
            return StructuredOutput(json_object=True)
        return StructuredOutput(json=json.dumps(fmt.json_schema.schema_))


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="a prompt or a batch of prompts: text or token ids"
    )
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1, description="only equal to n: no server-side best-of ranking")

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, v):
        if isinstance(v, list) and (not v or any(isinstance(p, list | str) and not p for p in v)):
            raise ValueError("prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError(
                "`best_of` other than `n` is not supported: every generated choice is returned.", param="best_of"
            )
        return self

    def prompts(self) -> list[str | tuple[int, ...]]:
        """The batch: each prompt as text or a tuple of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [tuple(p)]
        return [x if isinstance(x, str) else tuple(x) for x in p]

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


def tool_dicts(tools: list[Tool] | None) -> tuple[dict, ...]:
    """The tools as sent (unset fields left out): the prompt shows them to the model."""
    return tuple(t.model_dump(exclude_unset=True) for t in tools or ())


class TokenizeRequest(Strict):
    """vLLM's `POST /tokenize` body: a completion `prompt` or chat `messages`."""

    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] | None = None
    add_special_tokens: bool = Field(False, description="default: as the chat and completion routes tokenize")
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False

    def tool_dicts(self) -> tuple[dict, ...]:
        return tool_dicts(self.tools)

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequestError("send either `prompt` or `messages`.", param="prompt")
        return self


class DetokenizeRequest(Strict):
    model: str = Field(min_length=1)
    tokens: list[TokenId]
