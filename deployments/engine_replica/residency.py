"""Which adapters one LLMServer replica holds, and keeping that true in the engine.

Requests carry the registry's adapter id as Serve's multiplexed model id; the deployment's request
router (adapter_router.py) places each adapter on its home replicas, using what this module
reports (`routing_stats`).

The engine's adapters are managed here, at most `capacity` of them:
- each adapter is loaded once per replica even when many first requests arrive together;
- to make room, the least recently used adapter that no request is generating with leaves the
  engine (`remove_adapter`: really dropped; Ray Serve LLM leaves evicted adapters in the engine);
- an adapter in use is never dropped under its requests: while every held adapter is in use, a
  request for a new one waits until one is idle. Dropping it at once makes vLLM reload it from
  disk at its next step for the requests still running (and evict another in turn), and fails
  them if its files are gone (tests/serve/test_adapter_admission.py). Waiting is what vLLM's
  scheduler does too (at most `max_loras` adapters in a batch); base requests and requests for
  held adapters never wait;
- when a slot frees, the waiting adapter with the most waiting requests takes it (adapter-aware
  admission: vLLM's scheduler gives it to the oldest waiting request's adapter). The batch then
  holds more requests: simulating 16 closed-loop clients over 16 adapters and 4 slots
  (bench/admission_sim.py), the engine runs 11% more requests per step. An adapter passed over
  `PASSES_BEFORE_FIRST` x capacity times goes first, which bounds how long a lone request waits.
Adapters unregistered or replaced in the registry leave the engine as soon as the registry's
long-poll says so (after their last running request). Registry records marked `preload` are loaded
before the replica takes requests and as soon as they are registered (up to `capacity`), so their
first request does no load; `pinned` ones are never chosen for eviction (at most capacity - 1 of
them, so that other adapters still find a slot).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator

from lora_registry.adapter_store import LOAD_BUCKETS_S, AdapterRecord, RegistryState, ReplicaResidency
from lora_registry.follower import follow_registry
from lora_registry.remote_sources import AdapterCache, AdapterSourceError, is_url
from serve_app.errors import AdapterLoadError, LorafleetError
from serve_app.messages import AdapterRef
from serve_app.platform import replica_logger

logger = replica_logger(__name__)
HEARTBEAT_S = 5.0
PASSES_BEFORE_FIRST = 4  # x capacity: then an adapter waiting for a slot goes first


class AdapterResidency:
    def __init__(
        self,
        engine,
        model_name: str,
        capacity: int,
        registry=None,
        replica_id: str = "local",
        engine_slots: int | None = None,
        cache: AdapterCache | None = None,
        lora_modules: tuple[str, ...] | None = None,
    ):
        from ray import serve

        self.engine, self.model_name, self.registry, self.replica_id = engine, model_name, registry, replica_id
        self.capacity = capacity  # adapters held in the engine (max_cpu_loras)
        self.engine_slots = engine_slots or capacity  # adapters one batch can mix (max_loras), reported only
        self.lora_modules = lora_modules  # what the engine applies LoRA to (None: all), reported only
        self.pinned: set[int] = set()
        # preloaded once per adapter id (at start, on registration, when marked): an evicted one is
        # not loaded again at every registry heartbeat, which would churn under pressure
        self.preloaded: set[int] = set()
        self.loads, self.load_seconds = 0, 0.0  # loads into the engine, their total time
        self.load_buckets = [0] * len(LOAD_BUCKETS_S)  # loads of at most LOAD_BUCKETS_S[i] seconds
        self.refs: dict[int, AdapterRef] = {}
        self.cache = cache  # where adapters from object stores are downloaded to on this node
        self.local_paths: dict[int, str] = {}  # adapter id -> its cached folder, for URL adapters
        self.held: OrderedDict[int, None] = OrderedDict()  # in the engine, least recently used first
        self.in_use: Counter[int] = Counter()  # adapter id -> requests using it (or waiting for it)
        self.leaving: set[int] = set()  # unregistered while in use: dropped after its last request
        self.loading: dict[int, asyncio.Task] = {}
        self.queued: dict[int, int] = {}  # waiting for a slot, oldest first -> times passed over
        self.freed = asyncio.Event()  # set whenever an adapter may have become idle
        self._tasks: set[asyncio.Task] = set()

        async def route(model_id: str) -> str:
            return model_id  # Serve only records that this replica serves the id

        self._routing = serve.multiplexed(max_num_models_per_replica=capacity)(route)

    async def start(self) -> None:
        """Load the adapters to preload (before the replica takes requests), then follow the registry."""
        if self.registry is None:
            return
        state = await self.registry.state.remote()
        await asyncio.gather(*self._apply(state))
        await self.report()
        self._spawn(follow_registry(self.registry, self._on_registry_state, state.version, HEARTBEAT_S))

    @contextlib.asynccontextmanager
    async def use(self, adapter: AdapterRef | None, warm: bool = False) -> AsyncIterator[str]:
        """Hold `adapter` in the engine while the block runs; yields where it stood: "base" (no
        adapter), "resident" (held already) or "loaded" (this request waited for it to load).
        `warm`: no request of its own (a registration's load ahead of its first request): it loads
        only into a free slot, and the adapter stays least recently used until a request uses it."""
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
                    self.loading[adapter_id] = self._spawn(self._load(adapter_id, evict=not warm))
                await asyncio.shield(self.loading[adapter_id])
            if adapter_id in self.held:  # (not when the registry dropped it meanwhile)
                self.held.move_to_end(adapter_id, last=not warm)
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

    def localized(self, adapter: AdapterRef | None) -> AdapterRef | None:
        """`adapter` with the folder its files were downloaded to on this node (for URL adapters):
        the engine may read the path again whenever it reloads the adapter."""
        if adapter is None or adapter.adapter_id not in self.local_paths:
            return adapter
        return dataclasses.replace(adapter, path=self.local_paths[adapter.adapter_id])

    async def _download(self, adapter_id: int) -> None:
        """A URL adapter's files into this node's cache (before it takes a slot: a download may be slow)."""
        ref = self.refs[adapter_id]
        if adapter_id in self.local_paths or not is_url(ref.path):
            return
        if self.cache is None or ref.checksum is None:
            raise AdapterSourceError(f"adapter '{ref.name}' comes from {ref.path}, and this replica has no cache.")
        started = time.perf_counter()
        folder = await asyncio.to_thread(self.cache.local, ref.path, ref.checksum)
        self.local_paths[adapter_id] = str(folder)
        logger.info("adapter '%s' from %s in %.2f s", ref.name, ref.path, time.perf_counter() - started)

    async def _load(self, adapter_id: int, evict: bool = True) -> None:
        try:
            await self._download(adapter_id)
            # a warm-up alone gives up when no slot is free by now; once a request waits for the
            # same load, it takes a slot as that request would
            if not evict and not self.has_free_slot(adapter_id) and self.in_use[adapter_id] <= 1:
                return
            await self.take_slot(adapter_id)
            started, ref = time.perf_counter(), self.localized(self.refs[adapter_id])
            try:
                await self.engine.add_adapter(ref)
                self._count_load(time.perf_counter() - started)
            except BaseException as error:
                self.held.pop(adapter_id, None)  # (unless the registry dropped it meanwhile; the finally wakes waiters)
                if await self._adapters_fault(error):
                    logger.warning("the engine could not load adapter '%s': %r", ref.name, error)
                    raise AdapterLoadError(ref.name, error) from None
                raise
            # not awaited: the report asks the engine and the registry (~3 ms on the CPU), which the
            # request waiting for this load need not wait for
            self._spawn(self.report())
        finally:
            self.loading.pop(adapter_id, None)
            self.freed.set()  # whoever left while it loaded, it may be idle now

    async def _adapters_fault(self, error: BaseException) -> bool:
        """Whether a failed load was the adapter's files' fault (a 400 that says so), not the
        engine's: a cancellation, a timeout, memory, or an engine that is dead or stopping keep
        their own errors (5xx, which clients retry)."""
        if not isinstance(error, Exception) or isinstance(error, (LorafleetError, TimeoutError)):
            return False
        if "out of memory" in str(error).lower():
            return False
        try:
            await asyncio.wait_for(self.engine.check_health(), timeout=5)
        except Exception:  # noqa: BLE001  (any failure of the check means: not the adapter's fault)
            return False
        return True

    async def take_slot(self, adapter_id: int) -> None:
        """Give `adapter_id` a place in `held`, waiting in line while every held adapter is
        generating. The place is taken before any await, so concurrent loads never overfill it."""
        self.queued[adapter_id] = 0
        try:
            while True:
                full = len(self.held) + len(self.leaving) >= self.capacity
                idle = self._least_recently_used_idle() if full else None
                if not full or (idle is not None and self.next_in_line() == adapter_id):
                    break
                self.freed.clear()
                await self.freed.wait()
        finally:
            del self.queued[adapter_id]
        self.held[adapter_id] = None
        for other in self.queued:
            self.queued[other] += 1
        self.freed.set()  # the next in line may find another idle slot
        if full:
            del self.held[idle]
            await self._remove_from_engine(idle)

    async def warm(self, adapter: AdapterRef) -> str:
        """Load a just-registered adapter ahead of its first request if a slot is free: a warm-up
        never evicts. Returns "resident" (held already), "loaded" or "skipped" (no free slot)."""
        if adapter.adapter_id in self.held:
            return "resident"
        if not self.has_free_slot(adapter.adapter_id):
            return "skipped"
        async with self.use(adapter, warm=True):
            return "loaded" if adapter.adapter_id in self.held else "skipped"

    def has_free_slot(self, adapter_id: int) -> bool:
        """Whether `adapter_id` could be loaded now without evicting anything."""
        return adapter_id not in self.held and len(self.held) + len(self.leaving) < self.capacity

    def _count_load(self, seconds: float) -> None:
        self.loads, self.load_seconds = self.loads + 1, self.load_seconds + seconds
        for i, bound in enumerate(LOAD_BUCKETS_S):
            self.load_buckets[i] += seconds <= bound

    def _least_recently_used_idle(self) -> int | None:
        return next(
            (i for i in self.held if not self.in_use[i] and i not in self.loading and i not in self.pinned), None
        )

    def next_in_line(self) -> int | None:
        """The waiting adapter that takes the next free slot: one passed over too often, else the one
        with the most waiting requests; the oldest among equals."""
        starved = PASSES_BEFORE_FIRST * self.capacity
        return max(self.queued, key=lambda i: (self.queued[i] >= starved, self.in_use[i]), default=None)

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
        with contextlib.suppress(Exception):
            await self.registry.report_residency.remote(await self.snapshot())

    def routing_stats(self) -> dict:
        """For the deployment's request router (adapter_router.py): the adapter ids held here, how
        many more could be loaded without waiting (slots neither generating, loading nor pinned), and
        the requests per adapter id running or waiting here."""
        busy = {i for i in self.held if self.in_use[i] or i in self.loading or i in self.pinned}
        return {
            "held": [str(i) for i in self.held],
            "free_slots": self.capacity - len(busy) - len(self.leaving),
            "in_flight": {str(i): n for i, n in self.in_use.items() if n > 0},
        }

    async def snapshot(self) -> ReplicaResidency:
        return ReplicaResidency(
            replica=self.replica_id,
            model=self.model_name,
            adapter_ids=tuple(sorted(await self.engine.loaded_adapter_ids())),
            engine_slots=self.engine_slots,
            host_slots=self.capacity,
            in_use=sum(1 for i in self.held if self.in_use[i]),
            waiting=sum(self.in_use[i] for i in self.queued),
            loads=self.loads,
            load_seconds=round(self.load_seconds, 6),
            load_buckets=tuple(self.load_buckets),
            pinned=tuple(sorted(self.pinned & set(self.held))),
            lora_modules=self.lora_modules,
        )

    async def _on_registry_state(self, state: RegistryState) -> None:
        for load in self._apply(state):
            self._spawn(load)
        await self.report()  # also the heartbeat that keeps this replica listed

    def _apply(self, state: RegistryState) -> list:
        """Follow the registry: adapters it no longer has (unloaded, or replaced: the id changed)
        leave; the pinned set is its pinned records; returns the loads of records to preload."""
        live = {r.adapter_id for r in state.adapters.values()}
        for adapter_id in [i for i in self.held if i not in live]:
            self._spawn(self.remove(adapter_id))
        mine = sorted((r for r in state.adapters.values() if r.base_model == self.model_name), key=_preload_order)
        self.pinned = {r.adapter_id for r in mine if r.pinned}
        self.pinned = set(sorted(self.pinned)[: max(self.capacity - 1, 0)])
        wanted = [r for r in mine if r.preload][: self.capacity]
        fresh = [r for r in wanted if r.adapter_id not in self.preloaded]
        self.preloaded.update(r.adapter_id for r in fresh)
        return [self._preload(r) for r in fresh if r.adapter_id not in self.held and r.adapter_id not in self.loading]

    async def _preload(self, record: AdapterRecord) -> None:
        try:
            async with self.use(record.ref()):
                pass
        except Exception:  # its requests will load it (and get the error) instead
            logger.warning("preloading adapter '%s' failed", record.name, exc_info=True)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def _preload_order(record: AdapterRecord) -> tuple:
    return (not record.pinned, record.adapter_id)  # pinned first, then in order of registration
