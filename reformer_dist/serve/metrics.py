"""Prometheus metrics of one server (``GET /metrics``).

Each server owns its registry (no process-global state), so tests can start several apps in one process.
Throughput is exported twice: as the counter ``reformer_generated_tokens_total`` (graph it with ``rate()``)
and as the gauge ``reformer_generated_tokens_per_second``, measured by the engine over its last seconds.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("reformer_requests", "HTTP requests answered.", ["endpoint", "status"],
                                registry=r)
        self.errors = Counter("reformer_request_errors", "HTTP requests answered with an error.",
                              ["endpoint", "type"], registry=r)
        self.latency = Histogram("reformer_request_latency_seconds", "Request latency to the last byte.",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("reformer_time_to_first_token_seconds",
                                             "Admission to the first generated token of a sequence.",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("reformer_prompt_tokens", "Prompt tokens admitted.", registry=r)
        self.generated_tokens = Counter("reformer_generated_tokens", "Tokens generated.", registry=r)
        self.tokens_per_second = Gauge("reformer_generated_tokens_per_second",
                                       "Tokens generated per second over the engine's recent window.",
                                       registry=r)
        self.queue_depth = Gauge("reformer_queue_depth", "Sequences admitted but waiting for a batch slot.",
                                 registry=r)
        self.active_sequences = Gauge("reformer_active_sequences", "Sequences in the decoding batch.",
                                      registry=r)
        self.batch_size = Histogram("reformer_batch_size", "Sequences per decode step.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.step_seconds = Histogram("reformer_step_seconds", "Wall time of one batched model step.",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("reformer_rejected", "Sequences refused at admission.", ["reason"],
                                registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
