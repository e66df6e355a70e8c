"""Errors that reach users. Each maps to one HTTP status and OpenAI's error shape."""

from __future__ import annotations


class LorafleetError(Exception):
    """Base class: `status` is the HTTP status, `type` OpenAI's error type."""

    status = 500
    type = "internal_error"
    headers: dict[str, str] | None = None  # extra HTTP headers of the error response

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self):
        # Errors cross Ray deployments by pickle; subclasses have other __init__ signatures.
        return _restore, (type(self), self.args, self.__dict__)


def _restore(cls, args, state):
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class InvalidRequestError(LorafleetError, ValueError):
    status = 400
    type = "invalid_request_error"


class PromptTooLongError(InvalidRequestError):
    def __init__(self, prompt_tokens: int, max_tokens: int, param: str = "messages"):
        what = "the prompt" if param == "prompt" else "the messages or the history"
        super().__init__(
            f"the prompt has {prompt_tokens} tokens but the model's context holds {max_tokens}; shorten {what}.",
            param=param,
            code="context_length_exceeded",
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens


class AuthenticationError(LorafleetError):
    status = 401
    type = "authentication_error"


class PermissionDeniedError(LorafleetError):
    status = 403
    type = "permission_error"


class NotFoundError(LorafleetError, LookupError):
    status = 404
    type = "not_found_error"


class ConflictError(LorafleetError):
    status = 409
    type = "conflict_error"


class PayloadTooLargeError(LorafleetError):
    status = 413
    type = "invalid_request_error"


class ClientClosedRequest(LorafleetError):
    """The client hung up before its request was read: not a server fault (nginx's 499)."""

    status = 499
    type = "client_closed_request"


class RateLimitError(LorafleetError):
    """A tenant key over its requests or tokens per minute: OpenAI's shape, with Retry-After."""

    status = 429

    def __init__(self, kind: str, limit: int, retry_after_s: int):
        super().__init__(
            f"rate limit reached for {kind} per minute (limit {limit}); retry in {retry_after_s} s.",
            code="rate_limit_exceeded",
        )
        self.type = kind  # OpenAI's types: "requests" or "tokens"
        self.headers = {"Retry-After": str(retry_after_s)}


class OverloadedError(LorafleetError):
    status = 503
    type = "overloaded_error"


class AdapterLoadError(InvalidRequestError):
    """The engine could not load a registered adapter's files (changed or broken since they were
    checked). A 400, so that clients do not retry what cannot work; the message says what to do."""

    def __init__(self, name: str, cause: BaseException):
        super().__init__(
            f"adapter '{name}' could not be loaded: {type(cause).__name__}: {str(cause)[:600]}. Register working "
            "files under this name (replace=true) or unload it.",
            param="model",
            code="adapter_load_failed",
        )


class ServiceUnavailableError(LorafleetError):
    """A dependency is down (the registry's database): try again shortly."""

    status = 503
    type = "service_unavailable_error"


class ConfigError(LorafleetError, ValueError):
    """A model or engine setting that cannot work; raised before anything starts."""

    status = 400
    type = "invalid_request_error"
