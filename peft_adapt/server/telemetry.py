"""Prometheus metrics of one server: bounded label sets only (a route template, a status code, a registered
adapter), so no request can make `/metrics` grow."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

UNMATCHED = "unmatched"  # every path that names no route shares this label


class ServerMetrics:
    def __init__(self, runtime, waiting, cancelled=lambda: 0):
        self.registry = CollectorRegistry()
        self.requests = Counter("peft_adapt_requests", "HTTP requests", ["route", "status"], registry=self.registry)
        self.latency = Histogram("peft_adapt_request_seconds", "request latency", ["route"], registry=self.registry)
        self.batch_sizes = Histogram("peft_adapt_batch_size", "requests per batch", registry=self.registry,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        # label: the registered adapter chosen, `mix` or `base` (bounded by the registry, not by requests)
        self.routes = Counter("peft_adapt_routes", "inputs routed, by the adapter chosen", ["adapter"],
                              registry=self.registry)
        self.registry.register(_RuntimeCollector(runtime, waiting, cancelled))

    def count_routes(self, routes) -> None:
        for route in routes:
            self.routes.labels("mix" if route.weights else route.adapter or "base").inc()

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def text(self) -> str:
        return generate_latest(self.registry).decode()


class _RuntimeCollector:
    """Residency counters, read without the runtime's lock (a scrape never waits for a batch)."""

    def __init__(self, runtime, waiting, cancelled):
        self.runtime, self.waiting, self.cancelled = runtime, waiting, cancelled

    def collect(self):
        stats = self.runtime.stats()
        for key in ("hits", "misses", "evictions", "resident", "resident_adapter_bytes"):
            gauge = GaugeMetricFamily(f"peft_adapt_adapter_{key}", f"adapter residency: {key}")
            gauge.add_metric([], stats[key])
            yield gauge
        gauge = GaugeMetricFamily("peft_adapt_queue_waiting", "requests waiting for a batch")
        gauge.add_metric([], self.waiting())
        yield gauge
        gauge = GaugeMetricFamily("peft_adapt_generations_cancelled", "generations stopped because the client left")
        gauge.add_metric([], self.cancelled())
        yield gauge
