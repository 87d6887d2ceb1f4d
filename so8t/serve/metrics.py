"""Prometheus metrics of one app (its own registry, so two apps in a process never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

NO_LABEL = "none"  # the safety label of a request no judge looked at
# Seconds; a tiny CPU model answers in tens of milliseconds, a 3.8 B one on CPU in tens of seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "so8t_think_requests", "/think requests by safety label, outcome and HTTP status",
            ("label", "outcome", "status"), registry=self.registry,
        )
        self.latency = Histogram(
            "so8t_think_latency_seconds", "/think latency from request start to response start",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.generated_tokens = Counter(
            "so8t_generated_tokens", "tokens generated for /think answers", registry=self.registry,
        )
        self.audit_write_failures = Counter(
            "so8t_audit_write_failures", "requests answered 503 because their audit row could not be written",
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "so8t_model_queue_depth", "requests waiting for or running on the model worker", registry=self.registry,
        )

    def observe_request(self, label: str | None, outcome: str, status: int, latency_seconds: float) -> None:
        self.requests.labels(label=label or NO_LABEL, outcome=outcome, status=str(status)).inc()
        self.latency.observe(latency_seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
