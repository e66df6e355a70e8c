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
