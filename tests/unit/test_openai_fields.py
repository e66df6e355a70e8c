"""Every field of the `openai` package's own request params is handled, ignored for a stated reason,
or refused by name: a field OpenAI adds cannot slip through silently."""

import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params
from pydantic import ValidationError

from deployments.http.openai_schemas import IGNORED, REFUSED, ChatCompletionRequest, CompletionRequest
from serve_app.errors import InvalidRequestError

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}
CASES = [
    (ChatCompletionRequest, chat_create_params.CompletionCreateParamsBase, CHAT),
    (CompletionRequest, completion_create_params.CompletionCreateParamsBase, COMPLETION),
]


def openai_fields(params) -> set[str]:
    return set(params.__annotations__) | {"stream"}


@pytest.mark.parametrize("schema, params, _", CASES)
def test_every_openai_field_is_declared_or_refused_by_name(schema, params, _):
    unaccounted = openai_fields(params) - set(schema.model_fields) - set(REFUSED)
    assert not unaccounted, f"{schema.__name__} neither handles nor refuses {sorted(unaccounted)}"


def test_ignored_fields_are_accepted():
    ChatCompletionRequest.model_validate(
        CHAT | {"user": "u1", "metadata": {"k": "v"}, "service_tier": "auto", "prompt_cache_key": "k"}
    )
    assert set(IGNORED) <= set(ChatCompletionRequest.model_fields)


@pytest.mark.parametrize("schema, params, body", CASES)
def test_refused_fields_name_themselves(schema, params, body):
    for name in sorted(openai_fields(params) & set(REFUSED)):
        with pytest.raises(ValidationError) as caught:
            schema.model_validate(body | {name: {"x": 1}})
        error = caught.value.errors()[0]["ctx"]["error"]
        assert isinstance(error, InvalidRequestError) and error.param == name and f"`{name}`" in str(error)


@pytest.mark.parametrize("schema, _, body", CASES)
def test_unknown_and_misspelt_fields_are_refused(schema, _, body):
    for name in ("max_token", "temprature", "some_new_field"):
        with pytest.raises(ValidationError) as caught:
            schema.model_validate(body | {name: 1})
        assert caught.value.errors()[0]["type"] == "extra_forbidden"
        assert caught.value.errors()[0]["loc"] == (name,)
