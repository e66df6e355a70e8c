"""Prometheus metrics of one ingress replica, served on its `/metrics` route.

With several ingress replicas each reports its own share; sum them in Prometheus. The adapter
gauges are the engine replicas' own reports (through the registry), the same on every ingress
replica: one series per engine replica and model, so their number stays that of the replicas.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from lora_registry.adapter_store import LOAD_BUCKETS_S, ReplicaResidency

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
# Tenant keys named on /metrics by one ingress replica; later ones are counted as "(other)" (no key
# or tenant name has parentheses), so a deployment with thousands of keys does not make thousands of series.
MAX_KEY_LABELS = 100


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = self._counter(
            "lorafleet_requests", "Requests by model, route and HTTP status", ["model", "route", "status"]
        )
        self.errors = self._counter("lorafleet_errors", "Failed requests by model and error type", ["model", "type"])
        self.engine_requests = self._counter(
            "lorafleet_engine_requests",
            "Requests by model, the engine replica that took them, and whether their adapter was "
            "resident there, loaded for them, or none (base)",
            ["model", "replica", "adapter"],
        )
        self.engine_messages = self._counter(
            "lorafleet_engine_messages",
            "Messages from engine replicas to the ingress; completion tokens / messages = tokens per "
            "message, how much streams coalesce under load",
            ["model"],
        )
        self.prompt_tokens = self._counter("lorafleet_prompt_tokens", "Prompt tokens by model", ["model"])
        self.completion_tokens = self._counter("lorafleet_completion_tokens", "Generated tokens by model", ["model"])
        self.ttft = self._seconds("lorafleet_time_to_first_token_seconds", "Time to first token", _LATENCY_BUCKETS)
        # Where time to first token goes: the render call, then the engine replica's own share
        # (adapter load, queue, prefill); the rest of the ingress's TTFT is the hops between deployments.
        self.render_call = self._seconds(
            "lorafleet_render_seconds",
            "Rendering a request's prompts, by where: in the ingress's process, or the Renderer deployment's call",
            _STEP_BUCKETS,
            ["model", "where"],
        )
        self.render_work = self._seconds(
            "lorafleet_render_work_seconds",
            "The renderer's own work in a render call (template + tokenize); the call minus this is the hop",
            _STEP_BUCKETS,
        )
        self.engine_ttft = self._seconds(
            "lorafleet_engine_time_to_first_token_seconds",
            "On the engine replica: from taking the request to the first token (adapter load, queue, prefill)",
            _STEP_BUCKETS,
        )
        self.latency = self._seconds("lorafleet_request_latency_seconds", "Whole request latency", _LATENCY_BUCKETS)
        self.key_requests = self._counter(
            "lorafleet_key_requests",
            "Requests of tenant keys by tenant, key and HTTP status",
            ["tenant", "key", "status"],
        )
        self.key_tokens = self._counter(
            "lorafleet_key_tokens",
            "Tokens of tenant keys by tenant, key and kind (prompt, completion)",
            ["tenant", "key", "kind"],
        )
        self.rate_limited = self._counter(
            "lorafleet_key_rate_limited",
            "Requests refused with 429 by tenant, key and limit (requests, tokens)",
            ["tenant", "key", "limit"],
        )
        self._keys: set[str] = set()
        self.loop_lag = Histogram(
            "lorafleet_ingress_loop_lag_seconds",
            "How late the ingress's event loop wakes a timer: every await on this replica waits this long too",
            buckets=_STEP_BUCKETS,
            registry=self.registry,
        )

    def _counter(self, name: str, doc: str, labels: list[str]) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def _seconds(self, name: str, doc: str, buckets: tuple[float, ...], labels=("model",)) -> Histogram:
        """A duration histogram, by model unless said."""
        return Histogram(name, doc, list(labels), buckets=buckets, registry=self.registry)

    def finished(self, model: str, route: str, status: int, error_type: str | None = None) -> None:
        self.requests.labels(model, route, str(status)).inc()
        if error_type:
            self.errors.labels(model, error_type).inc()

    def key_labels(self, tenant: str, key: str) -> tuple[str, str]:
        """(tenant, key) as label values for the first MAX_KEY_LABELS keys seen, else "(other)" twice."""
        if key not in self._keys and len(self._keys) < MAX_KEY_LABELS:
            self._keys.add(key)
        return (tenant, key) if key in self._keys else ("(other)", "(other)")

    def render(self, replicas: list[ReplicaResidency] = ()) -> bytes:
        return generate_latest(self.registry) + generate_latest(_AdapterReports(replicas))


class _AdapterReports:
    """The engine replicas' adapter reports as metric families (a collector of one scrape)."""

    GAUGES = {
        "engine_slots": "Adapters one engine batch can mix (max_loras, as chosen for the replica)",
        "host_slots": "Adapters the replica keeps loaded (max_cpu_loras, as chosen for the replica)",
        "in_use": "Held adapters that requests are generating with now",
        "waiting": "Requests waiting for an adapter slot",
    }

    def __init__(self, replicas: list[ReplicaResidency]):
        self.replicas = replicas

    def collect(self):
        labels = ["model", "replica"]
        families = [GaugeMetricFamily(f"lorafleet_adapter_{k}", doc, labels=labels) for k, doc in self.GAUGES.items()]
        families.append(GaugeMetricFamily("lorafleet_adapters_held", "Adapters in the engine now", labels=labels))
        families.append(GaugeMetricFamily("lorafleet_adapters_pinned", "Held adapters never evicted", labels=labels))
        loads = CounterMetricFamily("lorafleet_adapter_loads", "Adapter loads into the engine", labels=labels)
        load_time = HistogramMetricFamily(
            "lorafleet_adapter_load_seconds", "Time of each adapter load into the engine", labels=labels
        )
        for r in self.replicas:
            values = [getattr(r, k) for k in self.GAUGES] + [len(r.adapter_ids), len(r.pinned)]
            for family, value in zip(families, values, strict=True):
                family.add_metric([r.model, r.replica], value)
            loads.add_metric([r.model, r.replica], r.loads)
            buckets = [(str(bound), n) for bound, n in zip(LOAD_BUCKETS_S, r.load_buckets, strict=True)]
            load_time.add_metric([r.model, r.replica], [*buckets, ("+Inf", r.loads)], r.load_seconds)
        yield from [*families, loads, load_time]
