"""The order in which waiting adapters take a freed engine slot (deployments/engine_replica/residency.py).

The real-stack test (tests/serve/test_adapter_admission.py) shows the most-waiting-requests-first
rule through Serve and vLLM; this one drives the residency's queue alone, with an engine that only
records adapters, to show the bound on how long a lone adapter can be passed over."""

import asyncio

from deployments.engine_replica.residency import PASSES_BEFORE_FIRST, AdapterResidency


class RecordingEngine:
    def __init__(self):
        self.ids: set[int] = set()

    async def remove_adapter(self, adapter_id: int) -> None:
        self.ids.discard(adapter_id)


async def slot_order(arrivals: list[list[tuple[int, int]]]) -> list[int]:
    """One slot, held by busy adapter 0. Before each turn, `arrivals[turn]` (adapter, requests
    waiting) join the line; then the holder finishes. Returns who took the slot, turn by turn."""
    residency = AdapterResidency(RecordingEngine(), "tiny", capacity=1)
    residency.held[0] = None
    residency.in_use[0] = 1
    holder, order = 0, []

    async def wait_for_slot(adapter_id: int, requests: int) -> None:
        residency.in_use[adapter_id] = requests
        await residency.take_slot(adapter_id)
        order.append(adapter_id)

    tasks = []
    for joining in arrivals:
        tasks += [asyncio.create_task(wait_for_slot(*waiting)) for waiting in joining]
        await asyncio.sleep(0)  # they queue behind the busy holder
        taken = len(order)
        del residency.in_use[holder]  # the holder's last request ends
        residency.freed.set()
        while len(order) == taken:
            await asyncio.sleep(0)
        holder = order[-1]
        assert list(residency.held) == [holder]  # never more adapters than slots
    for task in tasks:
        task.cancel()
    return order


def test_the_adapter_with_most_waiting_requests_goes_first_oldest_among_equals():
    order = asyncio.run(slot_order([[(1, 1), (2, 3), (3, 2), (4, 3)], [], [], []]))
    assert order == [2, 4, 3, 1]


def test_a_lone_request_is_passed_over_a_bounded_number_of_times():
    # adapter 1 has one waiting request; every turn a new adapter with two requests joins
    turns = [[(1, 1), (100, 2)]] + [[(100 + turn, 2)] for turn in range(1, 8)]
    order = asyncio.run(slot_order(turns))
    assert order.index(1) == PASSES_BEFORE_FIRST  # passed over 4 x capacity times, then first


class LoadingEngine(RecordingEngine):
    async def add_adapter(self, adapter) -> None:
        self.ids.add(adapter.adapter_id)

    async def loaded_adapter_ids(self) -> set[int]:
        return set(self.ids)


def test_a_registration_warm_up_takes_only_a_free_slot_and_stays_first_to_go():
    from serve_app.messages import AdapterRef

    async def scenario() -> tuple[list[int], list[int], list[int]]:
        engine = LoadingEngine()
        residency = AdapterResidency(engine, "tiny", capacity=2)

        async def route(model_id: str) -> str:  # Serve's multiplexing hook needs a replica; none here
            return model_id

        residency._routing = route

        async def ask(adapter_id: int, warm: bool = False) -> None:
            adapter = AdapterRef(f"a{adapter_id}", adapter_id, f"/a{adapter_id}", None)
            if warm:
                await residency.warm(adapter)
                return
            async with residency.use(adapter):
                pass

        await ask(1)  # a request's load: most recently used
        await ask(2, warm=True)  # a free slot: loaded, but first in line to leave
        after_warm = list(residency.held)
        await ask(3, warm=True)  # no free slot: nothing is evicted for a warm-up
        after_full = list(residency.held)
        await ask(3)  # a request evicts the idle, least recently used: the unused warm-up
        return after_warm, after_full, list(residency.held)

    after_warm, after_full, after_request = asyncio.run(scenario())
    assert after_warm == [2, 1]
    assert after_full == [2, 1]
    assert after_request == [1, 3]
