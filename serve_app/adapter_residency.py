"""Which adapters one LLMServer replica holds, and keeping that true in the engine.

Loading goes through Ray Serve's model multiplexing, keyed by the registry's adapter id:
- Serve's router sends a request for adapter X to a replica that reports X (affinity), and a cold
  adapter to a lightly loaded replica (power of two choices on queue length);
- Serve loads each id once per replica even when many first requests arrive together;
- Serve's per-replica LRU evicts beyond `capacity`, and eviction here calls the engine's
  `remove_adapter`, so the engine really drops it (Ray Serve LLM leaves it in the engine).
Adapters unregistered or replaced in the registry are removed from the engine as soon as the
registry's long-poll says so.

An adapter that requests are still using is never dropped under them: it leaves the engine when
its last request ends, and a new adapter waits for that room. Dropping it at once would make vLLM
reload it from disk at its next step for the requests still running (and evict another in turn):
with 16 adapters and 4 slots on an H100 that thrash cost 15% of LoRA throughput against vLLM's own
server (docs/benchmarks.md). Waiting is what vLLM's scheduler does too (at most `max_loras`
adapters in a batch); base requests and requests for resident adapters never wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator

from serve_app.engines.protocol import AdapterRef

logger = logging.getLogger(__name__)
HEARTBEAT_S = 5.0


class _Resident:
    """What Serve's multiplex cache holds per adapter; Serve calls `__del__` when it evicts it."""

    def __init__(self, owner: AdapterResidency, adapter_id: int):
        self.owner, self.adapter_id = owner, adapter_id
        self.removed = False

    def __del__(self):
        # Serve runs this in a worker thread on eviction; Python may also run it at collection.
        if self.removed:
            return
        self.removed = True
        future = asyncio.run_coroutine_threadsafe(self.owner.remove(self.adapter_id), self.owner.loop)
        if threading.current_thread() is not self.owner.loop_thread:
            with contextlib.suppress(Exception):
                future.result(timeout=60)  # the next load waits until the engine dropped this one


class AdapterResidency:
    def __init__(self, engine, model_name: str, capacity: int, registry=None, replica_id: str = "local"):
        from ray import serve

        self.engine, self.model_name, self.registry, self.replica_id = engine, model_name, registry, replica_id
        self.capacity = capacity
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.current_thread()
        self.refs: dict[int, AdapterRef] = {}
        self.residents: dict[int, _Resident] = {}
        self.in_use: Counter[int] = Counter()  # adapter id -> requests generating with it now
        self.leaving: set[int] = set()  # evicted or unregistered, still in the engine for in_use requests
        self.room = asyncio.Condition()
        self._drops: set[asyncio.Task] = set()

        async def load(model_id: str) -> _Resident:
            return await self._load(int(model_id))

        self._multiplexed_load = serve.multiplexed(max_num_models_per_replica=capacity)(load)
        self._tasks = [asyncio.create_task(self._follow_registry())] if registry is not None else []

    @contextlib.asynccontextmanager
    async def use(self, adapter: AdapterRef | None) -> AsyncIterator[str]:
        """Hold `adapter` in the engine while the block runs; yields where it stood: "base" (no
        adapter), "resident" (was there) or "loaded" (this request waited for it to load)."""
        if adapter is None:
            yield "base"
            return
        adapter_id = adapter.adapter_id
        was_resident = adapter_id in self.residents
        self.refs[adapter_id] = adapter
        await self._multiplexed_load(str(adapter_id))
        self.in_use[adapter_id] += 1  # no await since the load: Serve cannot have evicted it in between
        try:
            yield "resident" if was_resident else "loaded"
        finally:
            self.in_use[adapter_id] -= 1
            if not self.in_use[adapter_id]:
                del self.in_use[adapter_id]
                if adapter_id in self.leaving:  # a task: this may run while the request is cancelled
                    task = asyncio.create_task(self._drop(adapter_id))
                    self._drops.add(task)
                    task.add_done_callback(self._drops.discard)

    async def _load(self, adapter_id: int) -> _Resident:
        """Serve's multiplex load (one at a time, after Serve evicted its least recently used)."""
        if adapter_id in self.leaving:  # evicted while in use and still in the engine: keep it
            self.leaving.discard(adapter_id)
        else:
            async with self.room:  # until the evicted adapters' last requests are done
                await self.room.wait_for(lambda: len(self.residents) + len(self.leaving) < self.capacity)
            await self.engine.add_adapter(self.refs[adapter_id])
        resident = self.residents[adapter_id] = _Resident(self, adapter_id)
        await self.report()
        return resident

    async def remove(self, adapter_id: int) -> None:
        """Evicted by Serve or gone from the registry: out of the engine once no request uses it."""
        resident = self.residents.pop(adapter_id, None)
        if resident is not None:
            resident.removed = True
        if self.in_use[adapter_id]:
            self.leaving.add(adapter_id)
            return
        await self._drop(adapter_id)

    async def _drop(self, adapter_id: int) -> None:
        if adapter_id in self.residents or self.in_use[adapter_id]:  # taken back meanwhile
            return
        self.leaving.discard(adapter_id)
        with contextlib.suppress(Exception):
            await self.engine.remove_adapter(adapter_id)
        self.refs.pop(adapter_id, None)
        async with self.room:
            self.room.notify_all()
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
            for adapter_id in [i for i in self.residents if i not in live]:
                await self.remove(adapter_id)
            await self.report()  # also the heartbeat that keeps this replica listed

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
