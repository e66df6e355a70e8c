"""Ingress deployment: the OpenAI-compatible HTTP API in front of the renderer and the LLM servers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from deployments.http.admin_schemas import (
    AdapterCreate,
    AdapterUpdate,
    KeyCreate,
    LoadLoraRequest,
    UnloadLoraRequest,
)
from deployments.http.error_handlers import install_error_handlers, params_renamed, unwrap
from deployments.http.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from deployments.http.openapi import install_openapi
from deployments.http.request_metrics import Metrics
from deployments.http.responses import ResponseBuilder, ResponseOptions
from deployments.http.tenants import Caller, Gate, RateLimits, bearer
from deployments.http.tool_calls import ToolPlan
from deployments.renderer import Renderer, adapter_chat_template
from lora_registry.adapter_store import AdapterRecord, RegistryState
from lora_registry.follower import follow_registry
from lora_registry.key_store import KEY_PREFIX, KeySpec, hash_key
from serve_app.config import AppConfig, ModelConfig
from serve_app.errors import (
    ClientClosedRequest,
    InvalidRequestError,
    LorafleetError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
)
from serve_app.messages import AdapterRef, Delta, FirstMessage, GenerationRequest, RenderRequest, StructuredOutput
from serve_app.platform import freeze_startup_heap, replica_logger, set_up_replica_logging

logger = replica_logger(__name__)
REST_FIELDS = {"lora_name": "name", "lora_path": "path"}  # vLLM's route's field -> /v1/adapters' field
WEB_UI = (Path(__file__).resolve().parent.parent / "serve_app" / "web" / "index.html").read_text(encoding="utf-8")
app = FastAPI(title="lorafleet", description="OpenAI-compatible API for LLMs and LoRA adapters")


install_error_handlers(app)
install_openapi(app)


class Ingress:
    """Validates, authenticates, resolves `model` to a base model plus optional adapter, renders,
    then streams from that model's LLMServer and formats OpenAI responses."""

    async def __init__(self, config: AppConfig, renderer, servers: dict, registry):
        set_up_replica_logging()
        self.config = config
        self.renderer = renderer
        # Short prompts render here, with the Renderer deployment's own code: ~1 ms of work, against a
        # Serve call that waited 45-60 ms at 64 streams on an H200 (docs/benchmarks.md, issue 21).
        # Long ones still go to the Renderer deployment, which scales apart and keeps this loop free.
        self.local_renderer = Renderer(config.models) if config.renderer.inline_max_chars else None
        self.servers = servers
        self.registry = registry
        self.models: dict[str, ModelConfig] = {m.served_name: m for m in config.models}
        self.metrics = Metrics()
        self.created = int(time.time())
        self.gate = Gate(config.ingress)
        self.limits = RateLimits(share=1 / config.ingress.deployment.most_replicas)
        self._keys_refreshed = 0.0
        self._background: set[asyncio.Task] = set()
        self.adapter_state = await registry.state.remote()
        self._follower = asyncio.create_task(
            follow_registry(registry, self._set_adapter_state, self.adapter_state.version)
        )
        self._lag_watch = asyncio.create_task(self._watch_loop_lag())
        freeze_startup_heap()

    @classmethod
    def get_deployment_options(cls, config: AppConfig) -> dict:
        return config.ingress.deployment.serve_options("Ingress", streams=True)

    async def _watch_loop_lag(self, period_s: float = 0.05) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(period_s)
            self.metrics.loop_lag.observe(max(0.0, time.perf_counter() - started - period_s))

    async def _set_adapter_state(self, state: RegistryState) -> None:
        self._adopt(state)  # resolving a name then costs no actor call

    def _adopt(self, state: RegistryState) -> None:
        """Keep `state` unless this copy is newer: the long-poll's notice and a fetch made at the
        same time can arrive in either order."""
        if state.supersedes(self.adapter_state):
            self.adapter_state = state

    # --- routes -------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self):
        return {"status": "ok"}

    @app.get("/ui")
    async def web_ui(self):
        """The chat page: plain HTML and JS, no external assets, so it works offline."""
        return HTMLResponse(WEB_UI)

    @app.get("/metrics")
    async def metrics_route(self, request: Request):
        if self.adapter_state.keys_on:  # tenant keys are on: usage per key is the admin's to read
            await self._admin(request)
        replicas = []
        with contextlib.suppress(Exception):  # the registry restarting: the ingress's own metrics still answer
            replicas = await asyncio.wait_for(self.registry.replicas.remote(), timeout=2)
        return Response(self.metrics.render(replicas), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(self, request: Request):
        caller = await self.authenticate(request)
        return {"object": "list", "data": self.model_cards(caller)}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request):
        caller = await self.authenticate(request)
        for card in self.model_cards(caller):
            if card["id"] == model_id:
                return card
        await self.resolve(model_id, caller)  # raises the 404

    @app.get("/version")
    async def version(self):
        return {"version": _version()}

    @app.post("/tokenize")
    async def tokenize(self, request: Request):
        req = await self.read_body(request, TokenizeRequest)
        model, adapter = await self.resolve(req.model, request.state.caller)
        render = RenderRequest(
            model.served_name,
            messages=tuple(m.plain() for m in req.messages) if req.messages else None,
            prompt=req.prompt,
            tools=req.tool_dicts(),
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            adapter=adapter,
        )
        # Default: tokenized as the chat and completion routes tokenize, so `count` is their prompt_tokens
        special = bool(req.add_special_tokens)
        return await self.renderer.tokenize.remote(render, special, req.return_token_strs)

    @app.post("/detokenize")
    async def detokenize(self, request: Request):
        req = await self.read_body(request, DetokenizeRequest)
        model, _ = await self.resolve(req.model, request.state.caller)
        return {"prompt": await self.renderer.detokenize.remote(model.served_name, tuple(req.tokens))}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._observed("chat", request, self._chat(request))

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._observed("completion", request, self._completion(request))

    async def _chat(self, request: Request):
        req = await self.read_body(request, ChatCompletionRequest)
        model, adapter = await self.resolve(req.model, request.state.caller)
        request.state.model = req.model
        if not model.is_chat:
            raise InvalidRequestError(
                f"model '{req.model}' is a generation model without a chat template; use /v1/completions.",
                param="model",
            )
        plan = ToolPlan.for_request(req, model)
        render = RenderRequest(
            model.served_name,
            messages=req.plain_messages(),
            max_tokens=req.requested_max_tokens,
            tools=req.tool_dicts(),
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            truncate_prompt_tokens=req.truncate_prompt_tokens,
            adapter=adapter,
        )
        options = ResponseOptions(
            top_logprobs=req.num_logprobs,
            tool_format=plan.format,
            forced_tool_call=plan.forced,
            single_tool_call=plan.single_call,
            return_token_ids=req.return_token_ids,
            continuous_usage=req.continuous_usage,
            n=req.n,
        )
        structured = plan.structured or req.structured_output()
        req.check_n(model.sampling_defaults)
        caller = self.admit(request.state.caller, req.requested_max_tokens, req.n)
        return await self.generate("chat", req, [render], model, adapter, options, structured, caller)

    async def _completion(self, request: Request):
        req = await self.read_body(request, CompletionRequest)
        model, adapter = await self.resolve(req.model, request.state.caller)
        request.state.model = req.model
        if req.echo and req.stream and req.logprobs is not None:
            raise InvalidRequestError("`echo` with `logprobs` is not supported when streaming.", param="echo")
        renders = [
            RenderRequest(
                model.served_name,
                prompt=prompt,
                max_tokens=req.requested_max_tokens,
                truncate_prompt_tokens=req.truncate_prompt_tokens,
                return_text=bool(req.echo),
            )
            for prompt in req.prompts()
        ]
        options = ResponseOptions(
            top_logprobs=req.num_logprobs,
            return_token_ids=req.return_token_ids,
            continuous_usage=req.continuous_usage,
            n=req.n,
        )
        structured = req.structured_output()
        req.check_n(model.sampling_defaults)
        caller = self.admit(request.state.caller, req.requested_max_tokens, req.n * len(renders))
        return await self.generate("completion", req, renders, model, adapter, options, structured, caller)

    async def _observed(self, route: str, request: Request, work):
        """Run a route, counting it by model and status whatever happens."""
        try:
            response = await work
            self.metrics.finished(getattr(request.state, "model", "unknown"), route, response.status_code)
            self._count_tenant(request, response.status_code)
            return response
        except BaseException as exc:
            error = unwrap(exc)
            status = error.status if isinstance(error, LorafleetError) else 500
            model = getattr(request.state, "model", "unknown")
            # A hang-up is counted by its status (499) but is not an error of the server's.
            error_type = None if isinstance(error, ClientClosedRequest) else getattr(error, "type", "internal_error")
            self.metrics.finished(model, route, status, error_type)
            self._count_tenant(request, status)
            if error is not exc:
                raise error from None
            raise

    # --- adapter admin (the admin key; tenant keys that may register, for their own adapters) ---

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, request: Request):
        body = await self.read_admin_body(request, LoadLoraRequest, tenants_may_register=True)
        caller = request.state.caller
        base = self._check_registrant(caller, body.lora_name, body.base_model, body.force, body.pinned, body.preload)
        record = await self.registry.register.remote(
            body.lora_name, body.lora_path, base, body.replace, body.force, body.pinned, body.preload, caller.tenant
        )
        self._registered(record)
        return {
            "object": "lora_adapter",
            "message": f"Success: LoRA adapter '{body.lora_name}' added successfully.",
            **record.to_dict(),
        }

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, request: Request):
        body = await self.read_admin_body(request, UnloadLoraRequest, tenants_may_register=True)
        self._check_owner(request.state.caller, body.lora_name, "lora_name")
        record = await self.registry.unregister.remote(body.lora_name)
        await self._refresh_adapters()
        return {
            "object": "lora_adapter",
            "message": f"Success: LoRA adapter '{body.lora_name}' removed successfully.",
            **record.to_dict(),
        }

    @app.get("/v1/adapters")
    async def list_adapters(self, request: Request):
        await self._admin(request)
        placements, replicas = await asyncio.gather(self.registry.describe.remote(), self.registry.replicas.remote())
        return {
            "object": "list",
            "data": [p.to_dict() for p in placements],
            "engine_replicas": [dataclasses.asdict(r) for r in replicas],  # slots chosen, in use, loads
        }

    @app.post("/v1/adapters", status_code=201)
    async def create_adapter(self, request: Request):
        body = await self.read_admin_body(request, AdapterCreate, tenants_may_register=True)
        caller = request.state.caller
        with params_renamed(REST_FIELDS):
            base = self._check_registrant(caller, body.name, body.base_model, body.force, body.pinned, body.preload)
            record = await self.registry.register.remote(
                body.name, body.path, base, body.replace, body.force, body.pinned, body.preload, caller.tenant
            )
        self._registered(record)
        return JSONResponse({"object": "lora_adapter", **record.to_dict()}, status_code=201)

    @app.patch("/v1/adapters/{name:path}")
    async def update_adapter(self, name: str, request: Request):
        """Pin or unpin, preload or not, an adapter already registered (its id stays)."""
        body = await self.read_admin_body(request, AdapterUpdate)  # residency flags are the admin's
        record = await self.registry.set_flags.remote(name, body.pinned, body.preload)
        await self._refresh_adapters()
        return {"object": "lora_adapter", **record.to_dict()}

    @app.delete("/v1/adapters/{name:path}")
    async def delete_adapter(self, name: str, request: Request):
        caller = await self._admin(request, tenants_may_register=True)
        self._check_owner(caller, name, "name")
        with params_renamed(REST_FIELDS):
            record = await self.registry.unregister.remote(name)
        await self._refresh_adapters()
        return {"object": "lora_adapter", "deleted": True, **record.to_dict()}

    # --- tenant keys (the admin key only) -----------------------------------------------------

    @app.post("/v1/keys", status_code=201)
    async def create_key(self, request: Request):
        body = await self.read_admin_body(request, KeyCreate)
        if self.config.ingress.admin_api_key is None:  # else nobody could manage keys once one exists
            raise InvalidRequestError(
                "tenant keys need ingress.admin_api_key (flag --admin_api_key): it is the key that manages them.",
                code="admin_key_not_configured",
            )
        spec = KeySpec(
            body.name,
            body.tenant,
            tuple(body.models),
            body.can_register,
            body.requests_per_minute,
            body.tokens_per_minute,
        )
        record, secret = await self.registry.create_key.remote(spec)
        await self._refresh_adapters()
        return JSONResponse({**record.to_dict(), "key": secret}, status_code=201)

    @app.get("/v1/keys")
    async def list_keys(self, request: Request):
        await self._admin(request)
        return {"object": "list", "data": [k.to_dict() for k in await self.registry.list_keys.remote()]}

    @app.delete("/v1/keys/{name:path}")
    async def revoke_key(self, name: str, request: Request):
        await self._admin(request)
        record = await self.registry.revoke_key.remote(name)
        await self._refresh_adapters()
        return {**record.to_dict(), "revoked": True}

    async def read_admin_body(self, request: Request, schema, tenants_may_register: bool = False):
        request.state.caller = await self._admin(request, tenants_may_register)
        return await self.read_body(request, schema, check_key=False)

    def _check_registrant(
        self, caller: Caller, name: str, base_model: str | None, force: bool, pinned: bool | None, preload: bool | None
    ) -> str | None:
        """The base model to register on. A tenant key registers adapters under its tenant's prefix
        (from its tenant's folder: the registry checks that), on base models it may use, without
        the flags that take slots on every replica or skip the checks."""
        if caller.key is None:
            return base_model
        if not caller.owns(name):
            raise PermissionDeniedError(
                f"this key registers adapters named '{caller.key.adapter_prefix}...' only.",
                param="lora_name",
                code="adapter_prefix_required",
            )
        # pinned/preload given at all (false too: on a replace it would clear the admin's)
        given = (("force", force), ("pinned", pinned is not None), ("preload", preload is not None))
        if flags := [flag for flag, on in given if on]:
            raise PermissionDeniedError(f"{', '.join(flags)}: only the admin key may set these.", param=flags[0])
        usable = [m for m in self.models if caller.may_use(m, self.models)]
        if not usable:
            raise PermissionDeniedError(
                "this key may use no base model, so it has none to register adapters on; its models "
                f"patterns are {list(caller.key.models)} (the admin sets them).",
                param="base_model",
            )
        if base_model is not None and base_model not in usable:
            raise NotFoundError(
                f"base model '{base_model}' is not one this key may use; it may use {usable}.", param="base_model"
            )
        if base_model is None and len(usable) != 1:
            raise InvalidRequestError(f"say which base_model (one of {usable}).", param="base_model")
        return base_model or usable[0]

    @staticmethod
    def _check_owner(caller: Caller, name: str, param: str) -> None:
        if not caller.owns(name):  # another tenant's adapter reads as one that does not exist
            raise NotFoundError(f"adapter '{name}' is not registered; GET /v1/models lists yours.", param=param)

    async def _keys(self, request: Request):
        """The tenant keys in force; an unknown tenant key makes the ingress ask the registry (at most
        once a second: the key may be a moment old, created through another ingress replica)."""
        given = bearer(request)
        keys = self.adapter_state.keys
        if given.startswith(KEY_PREFIX) and hash_key(given) not in keys:
            if time.monotonic() - self._keys_refreshed > 1.0:
                self._keys_refreshed = time.monotonic()
                await self._refresh_adapters()
        return self.adapter_state.keys

    async def _admin(self, request: Request, tenants_may_register: bool = False) -> Caller:
        """The caller of an admin route (tenant keys that may register: for their own adapters)."""
        keys = await self._keys(request)
        return self.gate.admin(request, keys, tenants_may_register, self.adapter_state.keys_on)

    async def authenticate(self, request: Request) -> Caller:
        """The caller of a /v1 route (401 if none), kept on `request.state.caller`."""
        caller = self.gate.caller(request, await self._keys(request), self.adapter_state.keys_on)
        if caller is None:
            raise self.gate.refused()
        request.state.caller = caller
        return caller

    def admit(self, caller: Caller, max_tokens: int | None, choices: int) -> Caller:
        """A tenant key's requests and tokens per minute (429 with Retry-After when over); the
        caller with the tokens set aside for what this request may generate."""
        if caller.key is None:
            return caller
        try:
            reserved = self.limits.admit(caller.key, max_tokens and max_tokens * choices)
        except RateLimitError as e:
            self.metrics.rate_limited.labels(*self._key_labels(caller), e.type).inc()
            raise
        return dataclasses.replace(caller, reserved_tokens=reserved)

    def _key_labels(self, caller: Caller) -> tuple[str, str]:
        return self.metrics.key_labels(caller.key.tenant, caller.key.name)

    def _count_tenant(self, request: Request, status: int) -> None:
        caller = getattr(request.state, "caller", None)
        if caller is not None and caller.key is not None:
            self.metrics.key_requests.labels(*self._key_labels(caller), str(status)).inc()

    def _charge(self, caller: Caller, builder: ResponseBuilder | None) -> None:
        """The tokens a tenant's request used, also when it failed or its client left mid-stream
        (none when it failed before generating: `builder` None)."""
        if caller.key is None:
            return
        used = 0
        if builder is not None:
            usage, labels = builder.usage, self._key_labels(caller)
            self.metrics.key_tokens.labels(*labels, "prompt").inc(usage["prompt_tokens"])
            self.metrics.key_tokens.labels(*labels, "completion").inc(usage["completion_tokens"])
            used = usage["total_tokens"]
        self.limits.settle(caller.key, caller.reserved_tokens, used)

    async def _refresh_adapters(self) -> None:
        self._adopt(await self.registry.state.remote())

    def _registered(self, record: AdapterRecord) -> None:
        """After a registration this ingress made: its copy of the registry gets the record at once
        (read-your-writes without a second registry call; the registry's next notice replaces the
        whole copy, and a request that finds no record still asks the registry), and the replica
        the adapter's first request will be routed to loads it now, if it has a free slot. The load
        is not awaited: it overlaps this answer and the client's next request, as vLLM's server
        loads an adapter at registration."""
        known = self.adapter_state.adapters.get(record.name)
        if known is None or known.adapter_id < record.adapter_id:  # (ids only grow: never put back an older one)
            adapters = {**self.adapter_state.adapters, record.name: record}
            self.adapter_state = dataclasses.replace(self.adapter_state, adapters=adapters)
        if self.models[record.base_model].deployment.may_scale_to_zero():
            return  # a registration alone does not start an engine replica
        handle = self.servers[record.base_model].options(multiplexed_model_id=str(record.adapter_id))
        self._spawn(self._warm(handle.warm_adapter.remote(record.ref()), record.name))

    @staticmethod
    async def _warm(response, name: str, timeout_s: float = 60.0) -> None:
        try:
            await asyncio.wait_for(response, timeout_s)  # (a replica that is not there yet: its request loads it)
        except Exception as error:  # its first request loads it instead (and reports any error)
            logger.warning("loading adapter '%s' ahead of its first request failed: %r", name, error)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)  # (the loop keeps only weak references to tasks)
        task.add_done_callback(self._background.discard)

    # --- request plumbing -------------------------------------------------------------------

    async def read_body(self, request: Request, schema, check_key: bool = True):
        if check_key:
            await self.authenticate(request)
        limit = self.config.ingress.max_body_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise PayloadTooLargeError(f"request body is larger than {limit} bytes.", code="body_too_large")
        try:
            body = await request.body()
        except ClientDisconnect:
            logger.debug("client hung up while sending %s %s", request.method, request.url.path)
            raise ClientClosedRequest("the client closed the connection before the body arrived.") from None
        if len(body) > limit:
            raise PayloadTooLargeError(f"request body is larger than {limit} bytes.", code="body_too_large")
        try:
            # strict: a string where a number or a boolean belongs is refused, as OpenAI does,
            # not converted ("max_tokens": "3", "stream": "yes")
            return schema.model_validate(json.loads(body), strict=True)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidRequestError(f"the body is not valid JSON: {e}", code="invalid_json") from None
        except ValidationError as e:
            for item in e.errors():  # a validator that names the field and the reason itself
                if isinstance(error := item.get("ctx", {}).get("error"), LorafleetError):
                    raise error from None
            raise InvalidRequestError(_describe(e), param=_first_loc(e)) from None

    async def resolve(self, name: str, caller: Caller) -> tuple[ModelConfig, AdapterRef | None]:
        """The base model and adapter `name` means, if the caller may use it (else the same 404 as for
        a name that does not exist)."""
        visible = caller.may_use(name, self.models)
        if visible and name in self.models:
            return self.models[name], None
        record = self.adapter_state.adapters.get(name)
        if record is None and visible:  # maybe registered a moment ago through another ingress replica
            self._adopt(await self.registry.state.remote())
            record = self.adapter_state.adapters.get(name)
        if record is not None and visible and caller.may_use(record.base_model, self.models):
            return self.models[record.base_model], record.ref()
        if visible and (base := self.adapter_state.unserved.get(name)) and caller.may_use(base, self.models):
            how = "serves it without LoRA" if base in self.models else "does not serve it"
            raise NotFoundError(
                f"adapter '{name}' is registered for model '{base}', and this app {how}; start it with the "
                "adapter in lora_modules (or engine.enable_lora) to serve it, or unload the adapter.",
                param="model",
                code="model_not_found",
            )
        raise NotFoundError(
            f"model '{name}' does not exist; GET /v1/models lists the served models and adapters.",
            param="model",
            code="model_not_found",
        )

    def model_cards(self, caller: Caller) -> list[dict]:
        def card(name: str, root: str, parent: str | None, base: ModelConfig) -> dict:
            return {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "lorafleet",
                "root": root,
                "parent": parent,
                "is_chat": base.is_chat,
                "max_model_len": base.engine.max_model_len,
            }

        # the rule of resolve(): an adapter is listed only where the caller may use it and its base
        cards = [card(name, name, None, m) for name, m in self.models.items()]
        for name, record in self.adapter_state.adapters.items():
            if caller.may_use(record.base_model, self.models):
                cards.append(card(name, record.path, record.base_model, self.models[record.base_model]))
        return [c for c in cards if caller.may_use(c["id"], self.models)]

    # --- generation -------------------------------------------------------------------------

    async def generate(
        self,
        kind: str,
        req,
        renders: list[RenderRequest],
        model: ModelConfig,
        adapter: AdapterRef | None,
        options: ResponseOptions,
        structured: StructuredOutput | None,
        caller: Caller,
    ):
        """Render every prompt, stream each from the model's LLMServer, and answer as one response
        (choice `index` runs across prompts, then `n`)."""
        try:
            rendered, streams, first, started = await self._open(
                kind, req, renders, model, adapter, options, structured
            )
        except BaseException:
            self._charge(caller, None)  # nothing was generated: the tokens set aside go back
            raise
        if any(r.return_text for r in renders):  # completions' echo: each prompt's text before its choices
            options = dataclasses.replace(options, echo=tuple(p.text for p in rendered))
        builder = ResponseBuilder(
            kind, req.model, len(rendered) * req.n, [list(p.prompt_ids) for p in rendered], options
        )
        stream = _merged(streams, req.n)
        if req.stream:
            return StreamingResponse(
                self._events(stream, streams, first, builder, req, started, caller), media_type="text/event-stream"
            )
        try:
            if first:
                builder.add_message(first)
            async with contextlib.aclosing(stream):
                async for deltas in stream:
                    builder.add_message(deltas)
        finally:  # a prompt that failed: the batch's other engine requests stop too
            for s in streams:
                s.cancel()
            self._charge(caller, builder)
        self._count(builder, req.model, started)
        return JSONResponse(builder.final())

    async def _open(self, kind, req, renders, model, adapter, options, structured):
        """Render the prompts and start their engine streams, up to each one's first message."""
        if req.priority and model.engine.engine_kwargs.get("scheduling_policy") != "priority":
            # vLLM takes a priority under first-come-first-served scheduling and ignores it
            raise InvalidRequestError(
                f"`priority` needs model '{model.served_name}' served with engine_kwargs "
                "{scheduling_policy: priority}; this one schedules first come, first served.",
                param="priority",
            )
        started = time.perf_counter()
        where, render = self._renderer_for(renders)
        rendered = await _all(render(r) for r in renders)
        self.metrics.render_call.labels(req.model, where).observe(time.perf_counter() - started)
        self.metrics.render_work.labels(req.model).observe(max(p.render_s for p in rendered))
        streams = [self._engine_stream(kind, req, p, model, adapter, options, structured) for p in rendered]
        openings = await _all((_first_message(s) for s in streams), return_exceptions=True)
        if failed := [o for o in openings if isinstance(o, BaseException)]:
            for s in streams:
                s.cancel()
            raise failed[0]
        self.metrics.ttft.labels(req.model).observe(time.perf_counter() - started)
        first = []
        for i, opening in enumerate(openings):
            if opening is not None:
                served = opening.served_by
                self.metrics.engine_requests.labels(req.model, served.replica, served.adapter).inc()
                self.metrics.engine_ttft.labels(req.model).observe(served.first_token_s)
                first += _shifted(opening.deltas, i * req.n)
        return rendered, streams, first, started

    def _renderer_for(self, renders: list[RenderRequest]):
        """Where a request's prompts render: here when they are short together and no adapter brings its
        own chat template (a tenant's template runs on the Renderer deployment, never on this loop)."""
        here = (
            self.local_renderer is not None
            and sum(r.size_chars() for r in renders) <= self.config.renderer.inline_max_chars
            and not any(r.adapter and adapter_chat_template(r.adapter) for r in renders)
        )
        return ("ingress", self.local_renderer.render) if here else ("renderer", self.renderer.render.remote)

    def _engine_stream(self, kind, req, rendered, model, adapter, options: ResponseOptions, structured):
        prompt_logprobs = req.prompt_logprobs
        if getattr(req, "echo", False) and req.num_logprobs is not None:  # echoed prompt tokens come with logprobs
            prompt_logprobs = max(prompt_logprobs or 0, req.num_logprobs)
        sampling = req.sampling_options(
            rendered.max_tokens, rendered.stop_token_ids, req.num_logprobs, model.sampling_defaults, structured
        )
        sampling = dataclasses.replace(sampling, prompt_logprobs=prompt_logprobs)
        request = GenerationRequest(f"{kind}-{uuid.uuid4().hex}", rendered.prompt_ids, sampling, adapter)
        # Requests for an adapter carry its id as the multiplexed model id: Serve routes them to a
        # replica that already holds it, or else to a lightly loaded one.
        multiplexed = str(adapter.adapter_id) if adapter else ""
        return self._engine_handle(model.served_name, multiplexed).generate.remote(request)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (one ingress per replica process, kept for its life)
    def _engine_handle(self, model: str, multiplexed: str):
        """The streaming handle for a model and adapter id, made once: `.options()` copies a handle."""
        return self.servers[model].options(stream=True, multiplexed_model_id=multiplexed)

    async def _events(self, stream, streams, first, builder: ResponseBuilder, req, started: float, caller: Caller):
        """SSE: one write per engine message (which may carry several tokens)."""
        try:
            if builder.options.echo:
                yield self._chunks(builder, _echo_deltas(builder))
            if first:
                yield self._chunks(builder, first)
            async with contextlib.aclosing(stream):
                async for deltas in stream:
                    yield self._chunks(builder, deltas)
            if req.include_usage:
                yield builder.usage_chunk()
            yield "data: [DONE]\n\n"
            self._count(builder, req.model, started)
        except Exception as exc:  # the engine failed mid-stream: tell the client in-band
            error = unwrap(exc)
            error = (
                error if isinstance(error, LorafleetError) else LorafleetError("the engine failed while generating.")
            )
            self.metrics.errors.labels(req.model, error.type).inc()
            yield f"data: {json.dumps(error.to_dict())}\n\ndata: [DONE]\n\n"
        finally:
            for s in streams:
                s.cancel()  # no-op when finished; aborts the engine request when the client left
            self._charge(caller, builder)

    @staticmethod
    def _chunks(builder: ResponseBuilder, deltas) -> str:
        builder.add_message(deltas)
        return "".join(builder.chunk(d) for d in deltas)

    def _count(self, builder: ResponseBuilder, model: str, started: float) -> None:
        usage = builder.usage
        self.metrics.prompt_tokens.labels(model).inc(usage["prompt_tokens"])
        self.metrics.completion_tokens.labels(model).inc(usage["completion_tokens"])
        self.metrics.engine_messages.labels(model).inc(builder.messages)
        self.metrics.latency.labels(model).observe(time.perf_counter() - started)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorafleet")
    except PackageNotFoundError:  # run from a checkout that was not pip-installed
        return "0+checkout"


def _shifted(deltas: list[Delta], offset: int) -> list[Delta]:
    """A prompt's deltas with choice indexes counted across the batch of prompts."""
    return deltas if not offset else [dataclasses.replace(d, index=d.index + offset) for d in deltas]


def _echo_deltas(builder: ResponseBuilder) -> list[Delta]:
    n = builder.options.n
    return [Delta(index=i, text=builder.options.echo[i // n], token_ids=()) for i in range(len(builder.choices))]


async def _merged(streams: list, n: int):
    """The later messages of every prompt's stream, as they come (the first were awaited already)."""
    if len(streams) == 1:
        async for deltas in streams[0]:
            yield deltas
        return
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(streams))  # pulled as the client takes it

    async def pump(i: int, stream) -> None:
        try:
            async for deltas in stream:
                await queue.put(_shifted(deltas, i * n))
            await queue.put(None)
        except BaseException as exc:  # handed to the consumer, which raises it
            await queue.put(exc)

    pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        for _ in streams:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
    finally:
        for task in pumps:
            task.cancel()


async def _all(awaitables, return_exceptions: bool = False) -> list:
    """asyncio.gather for our callers, but one awaitable is awaited in place: gather's task would first
    wait its turn behind every stream's callbacks on this loop (a render there measured 17.7 ms for
    0.7 ms of work). Unlike gather, a CancelledError (any BaseException) of that one propagates."""
    awaitables = list(awaitables)
    if len(awaitables) != 1:
        return await asyncio.gather(*awaitables, return_exceptions=return_exceptions)
    try:
        return [await awaitables[0]]
    except Exception as e:
        if not return_exceptions:
            raise
        return [e]


async def _first_message(stream) -> FirstMessage | None:
    """Await the first message so that errors before any output get a real HTTP status."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None
    except Exception as exc:
        raise unwrap(exc) from None


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:3]:
        loc = _loc(item) or "body"
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown field `{loc}` (lorafleet refuses fields it does not act on; README lists them)")
        else:
            parts.append(f"{loc}: {item['msg'].removeprefix('Value error, ')}")
    return "invalid request: " + "; ".join(parts)


def _first_loc(error: ValidationError) -> str | None:
    errors = error.errors()
    return (_loc(errors[0]) or None) if errors else None


# pydantic puts the union member it tried into an error's location ("content.str",
# "content.list[ContentPart]", "tool_choice.NamedToolChoice"); the client sent a field, not a type
_UNION_MEMBERS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _loc(item: dict) -> str:
    parts = (str(x) for x in item["loc"])
    return ".".join(p for p in parts if p not in _UNION_MEMBERS and "[" not in p and not p[:1].isupper())
