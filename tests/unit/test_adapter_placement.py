"""The adapter placement rules of the engine replicas' request router, on stand-in replicas (the
router in a real Serve app: tests/serve/test_adapter_homes.py)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

from deployments.engine_replica.adapter_router import home_order, placement_ranks


@dataclass(eq=False)
class Replica:
    name: str
    routing_stats: dict = field(default_factory=dict)
    multiplexed_model_ids: set = field(default_factory=set)

    @property
    def replica_id(self):
        return SimpleNamespace(unique_id=self.name)


def names(ranks):
    return [[r.name for r in rank] for rank in ranks]


def test_homes_spread_evenly_and_only_a_departed_replicas_adapters_move():
    replicas = [Replica(f"r{i}") for i in range(4)]
    homes = {str(a): home_order(str(a), replicas)[0].name for a in range(400)}
    assert all(80 <= n <= 120 for n in Counter(homes.values()).values()), Counter(homes.values())
    after = {str(a): home_order(str(a), replicas[:3])[0].name for a in range(400)}
    moved = {a for a in homes if homes[a] != after[a]}
    assert moved == {a for a in homes if homes[a] == "r3"}


def test_a_quiet_adapter_has_one_home_and_a_busy_one_spreads_in_its_ranking_order():
    replicas = [Replica(f"r{i}") for i in range(3)]
    order = [r.name for r in home_order("7", replicas)]

    def ranks_with(running: int, elsewhere: int = 0):  # the adapter's requests on its home, on another replica
        home = next(r for r in replicas if r.name == order[0])
        other = next(r for r in replicas if r.name == order[2])
        home.routing_stats = {"held": ["7"], "free_slots": 0, "in_flight": {"7": running, "9": 40}}
        other.routing_stats = {"held": ["7"] if elsewhere else [], "free_slots": 3, "in_flight": {"7": elsewhere}}
        return names(placement_ranks("7", replicas, requests_per_home=4))

    assert ranks_with(0) == [order[:1], order[1:]]
    assert ranks_with(3) == [order[:1], order[1:]]  # another adapter's requests do not count
    assert ranks_with(4) == [order[:2], order[2:]]
    assert ranks_with(3, elsewhere=5) == [
        order,
    ]  # counted on every replica; all three hold or are homes
    assert ranks_with(50) == [order]


def test_a_replica_holding_the_adapter_stays_a_choice_beside_its_home():
    replicas = [Replica(f"r{i}") for i in range(3)]
    home, second, third = home_order("7", replicas)
    third.routing_stats = {"held": ["7"], "free_slots": 0}
    assert names(placement_ranks("7", replicas, 16)) == [[home.name, third.name], [second.name]]
    # without routing stats yet, Serve's multiplexed ids say what a replica holds
    third.routing_stats, second.multiplexed_model_ids = {}, {"7"}
    assert names(placement_ranks("7", replicas, 16)) == [[home.name, second.name], [third.name]]


def test_a_cold_adapter_goes_to_the_first_replica_in_its_ranking_with_a_free_slot():
    replicas = [Replica(f"r{i}") for i in range(3)]
    home, second, third = home_order("7", replicas)
    for r in replicas:
        r.routing_stats = {"held": ["1", "2"], "free_slots": 1}
    assert names(placement_ranks("7", replicas, 16))[0] == [home.name]
    home.routing_stats["free_slots"] = 0
    assert names(placement_ranks("7", replicas, 16)) == [[second.name], [home.name, third.name]]
    second.routing_stats["free_slots"] = 0
    assert names(placement_ranks("7", replicas, 16))[0] == [third.name]
    third.routing_stats["free_slots"] = 0  # no room anywhere: its home, where it waits for a slot
    assert names(placement_ranks("7", replicas, 16))[0] == [home.name]
