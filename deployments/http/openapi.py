"""/openapi.json with the request bodies the routes read themselves."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from deployments.http.admin_schemas import (
    AdapterCreate,
    AdapterUpdate,
    KeyCreate,
    LoadLoraRequest,
    UnloadLoraRequest,
)
from deployments.http.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

# Routes read their bodies themselves (size limit first, OpenAI-shaped errors); this puts the body
# schemas into /openapi.json anyway, so clients and fuzzers (schemathesis) see them.
REQUEST_BODIES = {
    ("/v1/chat/completions", "post"): ChatCompletionRequest,
    ("/v1/completions", "post"): CompletionRequest,
    ("/v1/load_lora_adapter", "post"): LoadLoraRequest,
    ("/v1/unload_lora_adapter", "post"): UnloadLoraRequest,
    ("/v1/adapters", "post"): AdapterCreate,
    ("/v1/adapters/{name}", "patch"): AdapterUpdate,
    ("/v1/keys", "post"): KeyCreate,
    ("/tokenize", "post"): TokenizeRequest,
    ("/detokenize", "post"): DetokenizeRequest,
}


def install_openapi(app: FastAPI) -> None:
    app.openapi = lambda: _openapi(app)


def _openapi(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version="1", description=app.description, routes=app.routes)
        components = schema.setdefault("components", {})
        models = components.setdefault("schemas", {})
        for (path, method), model in REQUEST_BODIES.items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            models.update(body.pop("$defs", {}))
            models[model.__name__] = body
            schema["paths"][path][method]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
            }
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}, {}]
        app.openapi_schema = schema
    return app.openapi_schema
