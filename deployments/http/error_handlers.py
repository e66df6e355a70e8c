"""OpenAI-shaped JSON for every error the ingress returns, and Ray's wrappers taken off exceptions."""

from __future__ import annotations

import contextlib

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.errors import InvalidRequestError, LorafleetError, NotFoundError, OverloadedError
from serve_app.platform import replica_logger

logger = replica_logger(__name__)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(LorafleetError, _lorafleet_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)


async def _lorafleet_error(request: Request, exc: LorafleetError):
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException):
    kind = NotFoundError if exc.status_code == 404 else InvalidRequestError
    error = kind(f"{request.method} {request.url.path}: {exc.detail}")
    return JSONResponse(error.to_dict(), status_code=exc.status_code)


async def _unexpected_error(request: Request, exc: Exception):
    exc = unwrap(exc)
    if isinstance(exc, LorafleetError):
        return JSONResponse(exc.to_dict(), status_code=exc.status, headers=exc.headers)
    logger.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    error = LorafleetError("internal error; the server log has the details.")
    return JSONResponse(error.to_dict(), status_code=500)


@contextlib.contextmanager
def params_renamed(names: dict[str, str]):
    """Errors raised inside name the fields as this route's body spells them: the registry and the
    checks speak vLLM's names (`lora_name`, `lora_path`), the REST routes' bodies say `name`, `path`."""
    try:
        yield
    except Exception as e:
        error = unwrap(e)
        if isinstance(error, LorafleetError) and error.param in names:
            error.param = names[error.param]
            raise error from None
        raise


def unwrap(exc: BaseException) -> BaseException:
    """The original exception behind Ray's wrappers (RayTaskError keeps it as `.cause`)."""
    while getattr(exc, "cause", None) is not None and exc.cause is not exc:
        exc = exc.cause
    name = type(exc).__name__
    if name == "BackPressureError":
        return OverloadedError("the server is at capacity; retry shortly.", code="overloaded")
    if name in _REPLICA_GONE:  # Serve is replacing it; the request did not run to the end
        return OverloadedError("a serving replica stopped while handling this request; retry.", code="replica_died")
    return exc


_REPLICA_GONE = {"ActorDiedError", "RayActorError", "ActorUnavailableError", "ActorUnschedulableError"}
