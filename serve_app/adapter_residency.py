"""Which adapters one LLMServer replica holds, and keeping that true in the engine.

Routing goes through Ray Serve's model multiplexing, keyed by the registry's adapter id: Serve's
router sends a request for adapter X to a replica that reports X (affinity), and a cold adapter
to a lightly loaded replica (power of two choices on queue length).

The engine's adapters are managed here, at most `capacity` of them:
- each adapter is loaded once per replica even when many first requests arrive together;
- to make room, the least recently used adapter that no request is generating with leaves the
  engine (`remove_adapter`: really dropped; Ray Serve LLM leaves evicted adapters in the engine);
- an adapter in use is never dropped under its requests: while every held adapter is in use, a
  request for a new one waits until one is idle. Dropping it at once makes vLLM reload it from
  disk at its next step for the requests still running (and evict another in turn), and fails
  them if its files are gone (tests/serve/test_adapter_admission.py). Waiting is what vLLM's
  scheduler does too (at most `max_loras` adapters in a batch); base requests and requests for
  held adapters never wait.
Adapters unregistered or replaced in the registry leave the engine as soon as the registry's
long-poll says so (after their last running request).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator

from serve_app.engines.protocol import AdapterRef

logger = logging.getLogger(__name__)
HEARTBEAT_S = 5.0


class AdapterResidency:
    def __init__(self, engine, model_name: str, capacity: int, registry=None, replica_id: str = "local"):
        from ray import serve

        self.engine, self.model_name, self.registry, self.replica_id = engine, model_name, registry, replica_id
        self.capacity = capacity
        self.refs: dict[int, AdapterRef] = {}
        self.held: OrderedDict[int, None] = OrderedDict()  # in the engine, least recently used first
        self.in_use: Counter[int] = Counter()  # adapter id -> requests using it (or waiting for it)
        self.leaving: set[int] = set()  # unregistered while in use: dropped after its last request
        self.loading: dict[int, asyncio.Task] = {}
        self.freed = asyncio.Event()  # set whenever an adapter may have become idle
        self._tasks: set[asyncio.Task] = set()

        async def route(model_id: str) -> str:
            return model_id  # Serve only records that this replica serves the id

        self._routing = serve.multiplexed(max_num_models_per_replica=capacity)(route)
        if registry is not None:
            self._spawn(self._follow_registry())

    @contextlib.asynccontextmanager
    async def use(self, adapter: AdapterRef | None) -> AsyncIterator[str]:
        """Hold `adapter` in the engine while the block runs; yields where it stood: "base" (no
        adapter), "resident" (held already) or "loaded" (this request waited for it to load)."""
        if adapter is None:
            yield "base"
            return
        adapter_id = adapter.adapter_id
        self.refs[adapter_id] = adapter
        self.in_use[adapter_id] += 1  # from here on it is never chosen for eviction
        try:
            await self._routing(str(adapter_id))
            residency = "resident" if adapter_id in self.held and adapter_id not in self.loading else "loaded"
            if residency == "loaded":
                if adapter_id not in self.loading:  # the first request for it; later ones wait for the same load
                    self.loading[adapter_id] = self._spawn(self._load(adapter_id))
                await asyncio.shield(self.loading[adapter_id])
            if adapter_id in self.held:  # (not when the registry dropped it meanwhile)
                self.held.move_to_end(adapter_id)
            yield residency
        finally:
            self._release(adapter_id)

    def _release(self, adapter_id: int) -> None:
        self.in_use[adapter_id] -= 1
        if self.in_use[adapter_id]:
            return
        del self.in_use[adapter_id]
        self.freed.set()
        if adapter_id in self.leaving:
            self._spawn(self._drop(adapter_id))

    async def _load(self, adapter_id: int) -> None:
        try:
            while len(self.held) + len(self.leaving) >= self.capacity:
                idle = next((i for i in self.held if not self.in_use[i] and i not in self.loading), None)
                if idle is None:  # every held adapter is generating: wait for one to finish
                    self.freed.clear()
                    await self.freed.wait()
                    continue
                del self.held[idle]
                await self._remove_from_engine(idle)
            self.held[adapter_id] = None  # counted before the await, so concurrent loads see it
            try:
                await self.engine.add_adapter(self.refs[adapter_id])
            except BaseException:
                del self.held[adapter_id]  # (the finally below wakes whoever waits for room)
                raise
            await self.report()
        finally:
            self.loading.pop(adapter_id, None)
            self.freed.set()  # whoever left while it loaded, it may be idle now

    async def remove(self, adapter_id: int) -> None:
        """Gone from the registry: out of the engine now, or after its last running request."""
        if adapter_id not in self.held:
            return
        del self.held[adapter_id]
        if self.in_use[adapter_id]:
            self.leaving.add(adapter_id)
        else:
            await self._remove_from_engine(adapter_id)

    async def _drop(self, adapter_id: int) -> None:
        self.leaving.discard(adapter_id)
        await self._remove_from_engine(adapter_id)
        self.freed.set()

    async def _remove_from_engine(self, adapter_id: int) -> None:
        with contextlib.suppress(Exception):
            await self.engine.remove_adapter(adapter_id)
        if not self.in_use[adapter_id]:
            self.refs.pop(adapter_id, None)
        await self.report()

    async def report(self) -> None:
        if self.registry is None:
            return
        ids = sorted(await self.engine.loaded_adapter_ids())
        with contextlib.suppress(Exception):
            await self.registry.report_residency.remote(self.replica_id, self.model_name, ids)

    async def _follow_registry(self) -> None:
        """Drop adapters the registry no longer has (unload, or replace: the id changed)."""
        version = ""
        while True:
            try:
                state = await self.registry.listen.remote(version, HEARTBEAT_S)
            except Exception:
                logger.warning("registry unreachable; retrying", exc_info=True)
                await asyncio.sleep(1)
                continue
            version = state["version"]
            live = {r["adapter_id"] for r in state["adapters"].values()}
            for adapter_id in [i for i in self.held if i not in live]:
                await self.remove(adapter_id)
            await self.report()  # also the heartbeat that keeps this replica listed

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
