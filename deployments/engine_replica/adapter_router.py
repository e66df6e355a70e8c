"""Where a request for an adapter goes among a model's LLMServer replicas: Serve's request router
of that deployment (it runs in the caller, the ingress, one instance per handle).

- Each adapter has a home: the replica that ranks first for it by rendezvous hashing (highest
  hash of adapter id + replica id). Homes are spread evenly and stay put when replicas come and
  go (only the adapters of a replica that left move), so an adapter is loaded on one replica, not
  wherever the least loaded replica happened to be.
- A busy adapter gets more homes: the next replica in its ranking joins for every
  `requests_per_home` of its requests in flight on the replicas (from every ingress: their own
  counts, at most STATS_PERIOD_S old), so a hot adapter is not stuck on one replica (Ray issue
  65691) and a quiet one costs one slot in the whole fleet.
- A cold adapter (held nowhere) goes to the first replica in its ranking with a free slot, so it
  does not wait behind adapters that are generating on its home while another replica has room.
- Among the chosen replicas, and for base requests among all, Serve takes the shortest queue;
  when they are all full it falls back to the next rank.

What each replica holds, how many slots it has free and its requests per adapter come from the
replicas' routing stats (`LLMServer.record_routing_stats`, every `STATS_PERIOD_S`); before the first
stats, what it holds comes from Serve's multiplexed ids.
"""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter

STATS_PERIOD_S = 2.0


class AdapterPlacementRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, requests_per_home: int = 16):
        self.requests_per_home = requests_per_home

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        adapter = pending_request.metadata.multiplexed_model_id if pending_request else ""
        if not adapter:  # shortest queue among all; shuffled so that ties do not favour one replica
            return [random.sample(candidate_replicas, len(candidate_replicas))]
        return placement_ranks(adapter, candidate_replicas, self.requests_per_home)


def placement_ranks(adapter: str, replicas: list, requests_per_home: int) -> list[list]:
    """Replicas for a request for `adapter`, most preferred rank first (see the module's doc)."""
    order = home_order(adapter, replicas)
    in_flight = sum(_stats(r).get("in_flight", {}).get(adapter, 0) for r in replicas)
    homes = order[: 1 + in_flight // requests_per_home]
    holding = [r for r in order if adapter in held(r)]
    if holding:
        first = homes + [r for r in holding if r not in homes]
    else:  # cold: a home with a free slot, else the first replica in its ranking that has one
        first = [r for r in homes if free_slots(r)] or next(([r] for r in order if free_slots(r)), homes)
    rest = [r for r in order if r not in first]
    return [first, rest] if rest else [first]


def home_order(adapter: str, replicas: list) -> list:
    """Rendezvous hashing: the replicas ranked for one adapter, the same on every router."""
    return sorted(replicas, key=lambda r: _weight(adapter, r.replica_id.unique_id), reverse=True)


def _weight(adapter: str, replica: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{adapter}|{replica}".encode(), digest_size=8).digest(), "big")


def held(replica) -> set[str]:
    stats = _stats(replica)
    return set(stats["held"]) if "held" in stats else set(replica.multiplexed_model_ids)


def free_slots(replica) -> int:
    """Adapters the replica can load without waiting (unknown before its first stats: assume room)."""
    return _stats(replica).get("free_slots", 1)


def _stats(replica) -> dict:
    return replica.routing_stats or {}
