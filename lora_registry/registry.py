"""LoraRegistry deployment: the single source of truth for adapters.

One replica (a named actor that Serve's controller owns and restarts), backed by a database (a
SQLite file in the state dir, or PostgreSQL on clusters: database.py): every change is committed
before it is acknowledged, and a restarted replica, on any node, reloads it all. Ingress and
LLMServer replicas follow changes by long-polling `listen`, so resolving a name costs no call.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from lora_registry.adapter_files import AdapterInfo, check_adapter_fits, inspect_adapter
from lora_registry.adapter_store import AdapterPlacement, AdapterRecord, AdapterStore, RegistryState, ReplicaResidency
from lora_registry.database import Database
from lora_registry.key_store import KeyRecord, KeySpec, KeyStore
from lora_registry.path_policy import PathPolicy
from lora_registry.remote_sources import AdapterCache, is_url
from serve_app.engines import lora_targets
from serve_app.errors import ConfigError, ConflictError, InvalidRequestError, NotFoundError
from serve_app.platform import set_up_replica_logging

logger = logging.getLogger("ray.serve")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
RESIDENCY_TTL_S = 20.0


@dataclass(frozen=True)
class StartupAdapter:
    """An adapter of the config (`lora_modules`), registered when the registry starts."""

    base_model: str
    path: str
    pinned: bool = False
    preload: bool = True


@dataclass(frozen=True)
class BaseModelSpec:
    """What the registry checks adapters against, per served base model."""

    name: str
    config: dict  # the model's config.json
    lora_enabled: bool
    max_lora_rank: int
    supported_modules: frozenset | None  # None: anything peft can load (pt backend)
    lora_target_modules: str | list[str] = "all"  # the engine setting (engines/lora_targets.py)


class LoraRegistry:
    def __init__(
        self,
        state_dir: str,
        bases: list[BaseModelSpec],
        allowed_roots: list[str],
        startup: dict[str, StartupAdapter],
        database_url: str | None = None,
    ):
        set_up_replica_logging()
        state = Path(state_dir).expanduser()
        (state / "adapters").mkdir(parents=True, exist_ok=True)
        database = Database.for_state_dir(database_url, state)
        self.store = AdapterStore(database=database)
        self.key_store = KeyStore(database)
        self.bases = {b.name: b for b in bases}
        self.cache = AdapterCache(state / "adapter-cache")
        startup_roots = [a.path if is_url(a.path) else str(Path(a.path).parent) for a in startup.values()]
        self.policy = PathPolicy([*allowed_roots, str(state / "adapters"), *startup_roots])
        self.records: dict[str, AdapterRecord] = self.store.all()
        all_keys = self.key_store.all()
        self.keys: dict[str, KeyRecord] = _in_force(all_keys)  # by key hash
        self.keys_on = bool(all_keys)
        self.generation = uuid.uuid4().hex[:8]  # a restart invalidates every listener's version
        self.counter = 0
        self._changed: asyncio.Event | None = None
        self._changing = asyncio.Lock()
        self.residency: dict[str, tuple[ReplicaResidency, float]] = {}  # replica -> (its report, when)
        # base -> the modules its engines apply LoRA to (None: all); "auto" is decided after the startup adapters
        self.engine_modules = {
            b.name: lora_targets.decide(b.lora_target_modules, ())
            for b in bases
            if b.supported_modules is not None and b.lora_target_modules != "auto"
        }
        for name, adapter in startup.items():
            current = self.records.get(name)
            wanted = (self.policy.check(adapter.path), adapter.base_model, adapter.pinned, adapter.preload)
            if current is None or (current.path, current.base_model, current.pinned, current.preload) != wanted:
                self._register(name, adapter.path, adapter.base_model, True, False, adapter.pinned, adapter.preload)
        if held := self._unserved(self._servable()):
            logger.warning(
                "registered adapters not served: their base model runs here without LoRA or not at all "
                f"(lora_modules or engine.enable_lora serve them again): {', '.join(f'{n} ({b})' for n, b in held.items())}"
            )
        for b in bases:
            if b.supported_modules is not None and b.lora_target_modules == "auto":
                carried = [r.target_modules for r in self.records.values() if r.base_model == b.name]
                self.engine_modules[b.name] = lora_targets.decide("auto", carried)

    @classmethod
    def get_deployment_options(cls, ray_actor_options: dict | None = None) -> dict:
        """One replica: Serve's controller restarts it if it dies, and it reloads its state."""
        # Every ingress and engine replica keeps a `listen` long-poll (up to 30 s) open here, so a
        # stopping replica (app deleted or redeployed) would wait Serve's default 20 s for them to
        # end. They are only reads that their followers repeat; a change is committed before it is
        # acknowledged. Requests that change adapters fail while it is down: a dead replica is
        # noticed in 2 s, not 10 s.
        return dict(
            name="LoraRegistry",
            num_replicas=1,
            max_ongoing_requests=10_000,
            graceful_shutdown_timeout_s=2,
            health_check_period_s=2,
            ray_actor_options={"num_cpus": 0, **(ray_actor_options or {})},
        )

    # --- queries ------------------------------------------------------------------------------

    def _unserved(self, servable: dict[str, AdapterRecord]) -> dict[str, str]:
        """name -> base model of each stored adapter that `servable` (from _servable) leaves out."""
        return {n: r.base_model for n, r in sorted(self.records.items()) if n not in servable}

    def _servable(self) -> dict[str, AdapterRecord]:
        """The records the followers serve: an adapter kept from an earlier run whose base model
        is now served without LoRA (or not at all) stays stored, but is neither listed nor routed."""
        return {
            name: r
            for name, r in self.records.items()
            if (base := self.bases.get(r.base_model)) is not None and base.lora_enabled
        }

    async def state(self) -> RegistryState:
        servable = self._servable()
        return RegistryState(
            f"{self.generation}:{self.counter}",
            servable,
            dict(self.keys),
            self.keys_on,
            dict(self.engine_modules),
            self._unserved(servable),
        )

    async def listen(self, known_version: str, timeout_s: float = 30.0) -> RegistryState:
        """Long-poll: returns as soon as the state differs from `known_version`, or at the timeout."""
        event = self._event()
        if (await self.state()).version == known_version:
            try:
                await asyncio.wait_for(event.wait(), timeout_s)
            except TimeoutError:
                pass
        return await self.state()

    async def describe(self) -> list[AdapterPlacement]:
        """Records plus the engine replicas that hold each adapter now."""
        live, servable = await self.replicas(), self._servable()
        return [
            AdapterPlacement(
                rec, tuple(sorted(r.replica for r in live if rec.adapter_id in r.adapter_ids)), name in servable
            )
            for name, rec in self.records.items()
        ]

    async def replicas(self) -> list[ReplicaResidency]:
        """The last report of every engine replica heard from lately."""
        now = time.time()
        return [report for report, seen in self.residency.values() if now - seen < RESIDENCY_TTL_S]

    async def report_residency(self, report: ReplicaResidency) -> None:
        self.residency[report.replica] = (report, time.time())

    # --- changes ------------------------------------------------------------------------------

    async def register(
        self,
        name: str,
        path: str,
        base_model: str | None = None,
        replace: bool = False,
        force: bool = False,
        pinned: bool | None = None,
        preload: bool | None = None,
        tenant: str | None = None,
    ) -> AdapterRecord:
        """`tenant`: registered with a tenant key, so only from `<root>/<tenant>/` of an allowed root.
        `pinned`, `preload`: None keeps a replaced adapter's flags (off for a new one)."""
        self._check_name(name, replace)  # early: nothing is read for a name that is taken
        # The files are read (and an object store's downloaded) in a worker thread, before the lock:
        # the followers' long-polls are answered meanwhile, and a slow download holds up no other
        # change. A caller that gives up does not end the reading half-way.
        reading = asyncio.ensure_future(asyncio.to_thread(self._read_adapter, path, tenant))
        try:
            real, info, checksum = await asyncio.shield(reading)
        finally:
            await asyncio.wait([reading])
        async with self._changing:  # one change at a time: the name is checked again, then written
            try:
                return self._commit(name, real, info, checksum, base_model, replace, force, pinned, preload)
            finally:
                self._notify()

    async def unregister(self, name: str) -> AdapterRecord:
        async with self._changing:
            return self._unregister(name)

    def _unregister(self, name: str) -> AdapterRecord:
        if name not in self.records:
            raise NotFoundError(
                f"adapter '{name}' is not registered; GET /v1/models lists the adapters you may use.", param="lora_name"
            )
        self.store.delete(name)
        record = self.records.pop(name)
        self._notify()
        return record

    async def set_flags(self, name: str, pinned: bool | None, preload: bool | None) -> AdapterRecord:
        """Change an adapter's residency flags; its id and weights stay (followers pick it up)."""
        async with self._changing:
            return self._set_flags(name, pinned, preload)

    def _set_flags(self, name: str, pinned: bool | None, preload: bool | None) -> AdapterRecord:
        if name not in self.records:
            raise NotFoundError(
                f"adapter '{name}' is not registered; GET /v1/models lists the adapters you may use.", param="name"
            )
        current = self.records[name]
        flags = {"pinned": current.pinned if pinned is None else pinned}
        flags["preload"] = current.preload if preload is None else preload
        self.records[name] = self.store.set_flags(name, **flags)  # committed here
        self._notify()
        return self.records[name]

    async def create_key(self, spec: KeySpec) -> tuple[KeyRecord, str]:
        """A tenant key and its secret (the only time the secret exists outside the client)."""
        record, secret = self.key_store.create(spec)  # committed here
        self.keys[record.key_hash] = record
        self.keys_on = True
        self._notify()
        return record, secret

    async def revoke_key(self, name: str) -> KeyRecord:
        record = self.key_store.revoke(name)  # committed here
        self.keys.pop(record.key_hash, None)
        self._notify()
        return record

    async def list_keys(self) -> list[KeyRecord]:
        return self.key_store.all()

    def _register(
        self,
        name: str,
        path: str,
        base_model: str | None,
        replace: bool,
        force: bool,
        pinned: bool = False,
        preload: bool = False,
    ) -> AdapterRecord:
        """Register at once (the startup adapters of the config)."""
        self._check_name(name, replace)
        real, info, checksum = self._read_adapter(path, None)
        return self._commit(name, real, info, checksum, base_model, replace, force, pinned, preload)

    def _read_adapter(self, path: str, tenant: str | None) -> tuple[str, AdapterInfo, str | None]:
        """The checked path (or URL), the adapter's metadata, and for a URL the files' checksum."""
        real = self.policy.check(path, tenant)  # before anything under `path` is read
        if is_url(real):  # downloaded into this node's cache; engine replicas fetch and verify it
            local, checksum = self.cache.fetch_new(real)
            return real, inspect_adapter(local), checksum
        return real, inspect_adapter(real), None

    def _commit(
        self,
        name: str,
        real: str,
        info: AdapterInfo,
        checksum: str | None,
        base_model: str | None,
        replace: bool,
        force: bool,
        pinned: bool | None,
        preload: bool | None,
    ) -> AdapterRecord:
        self._check_name(name, replace)
        # new weights under a name keep its residency flags unless the registration says otherwise
        # (a tenant, who may not set them, does not clear the admin's)
        current = self.records.get(name)
        pinned = (current.pinned if current else False) if pinned is None else pinned
        preload = (current.preload if current else False) if preload is None else preload
        base = self._pick_base(base_model, info)
        if base.supported_modules is not None and (bad := set(info.target_modules) - base.supported_modules):
            raise ConfigError(
                f"adapter '{name}' targets {sorted(bad)}, which vLLM cannot apply LoRA to; "
                f"supported: {sorted(base.supported_modules)}.",
                param="lora_path",
            )
        engine = self.engine_modules.get(base.name)
        if bad := lora_targets.missing(info.target_modules, engine):
            raise ConfigError(
                lora_targets.refusal(name, base.name, bad, engine, base.lora_target_modules), param="lora_path"
            )
        check_adapter_fits(info, base.config, base.max_lora_rank, force=force)
        record = self.store.put(name, real, base.name, info.rank, info.target_modules, pinned, preload, checksum)
        self.records[name] = record  # committed above
        return record

    def _check_name(self, name: str, replace: bool) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequestError(
                f"adapter name '{name}' is not valid: use letters, digits and . _ : @ - (up to 128).", param="lora_name"
            )
        if name in self.bases:
            raise ConflictError(f"'{name}' is a base model name; pick another adapter name.", param="lora_name")
        if name in self.records and not replace:
            raise ConflictError(
                f"adapter '{name}' already exists; send replace=true to swap its weights (it gets a new id).",
                param="lora_name",
                code="adapter_exists",
            )

    def _pick_base(self, base_model: str | None, info) -> BaseModelSpec:
        if base_model is not None:
            if base_model not in self.bases:
                raise NotFoundError(
                    f"base model '{base_model}' is not served; choose one of {sorted(self.bases)}.", param="base_model"
                )
            base = self.bases[base_model]
        elif len(self.bases) == 1:
            base = next(iter(self.bases.values()))
        else:
            matches = [
                b
                for b in self.bases.values()
                if b.lora_enabled and info.base_model_name_or_path in (b.name, b.config.get("_name_or_path"))
            ]
            if len(matches) != 1:
                raise InvalidRequestError(
                    f"several base models are served; say which with base_model (one of {sorted(self.bases)}).",
                    param="base_model",
                )
            base = matches[0]
        if not base.lora_enabled:
            raise InvalidRequestError(
                f"model '{base.name}' is served without LoRA; set engine.enable_lora (flag --vllm_enable_lora true).",
                param="base_model" if base_model is not None else None,  # the field the caller sent, if any
                code="lora_not_enabled",
            )
        return base

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        self.counter += 1
        event, self._changed = self._event(), asyncio.Event()
        event.set()


def _in_force(keys: list[KeyRecord]) -> dict[str, KeyRecord]:
    return {k.key_hash: k for k in keys if k.revoked_at is None}
