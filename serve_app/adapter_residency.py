"""Which adapters one LLMServer replica holds, and keeping that true in the engine.

Loading goes through Ray Serve's model multiplexing, keyed by the registry's adapter id:
- Serve's router sends a request for adapter X to a replica that reports X (affinity), and a cold
  adapter to a lightly loaded replica (power of two choices on queue length);
- Serve loads each id once per replica even when many first requests arrive together;
- Serve's per-replica LRU evicts beyond `capacity`, and eviction here calls the engine's
  `remove_adapter`, so the engine really drops it (Ray Serve LLM leaves it in the engine).
Adapters unregistered or replaced in the registry are removed from the engine as soon as the
registry's long-poll says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

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
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.current_thread()
        self.refs: dict[int, AdapterRef] = {}
        self.residents: dict[int, _Resident] = {}

        async def load(model_id: str) -> _Resident:
            return await self._load(int(model_id))

        self._multiplexed_load = serve.multiplexed(max_num_models_per_replica=capacity)(load)
        self._tasks = [asyncio.create_task(self._follow_registry())] if registry is not None else []

    async def ensure(self, adapter: AdapterRef) -> bool:
        """Make `adapter` resident on this replica; True when it was not resident before."""
        was_resident = adapter.adapter_id in self.residents
        self.refs[adapter.adapter_id] = adapter
        await self._multiplexed_load(str(adapter.adapter_id))
        return not was_resident

    async def _load(self, adapter_id: int) -> _Resident:
        await self.engine.add_adapter(self.refs[adapter_id])
        resident = self.residents[adapter_id] = _Resident(self, adapter_id)
        await self.report()
        return resident

    async def remove(self, adapter_id: int) -> None:
        resident = self.residents.pop(adapter_id, None)
        if resident is not None:
            resident.removed = True
        with contextlib.suppress(Exception):
            await self.engine.remove_adapter(adapter_id)
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
            for adapter_id in [i for i in self.residents if i not in live]:
                await self.remove(adapter_id)
            await self.report()  # also the heartbeat that keeps this replica listed

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
