"""The server's Prometheus metrics (GET /metrics), in a registry of their own per app.

    cgpt_jax_requests_total{endpoint, status}     requests answered, by HTTP status
    cgpt_jax_prompt_tokens_total                  prompt tokens prefilled
    cgpt_jax_completion_tokens_total              tokens generated
    cgpt_jax_queue_depth                          requests waiting for a decode slot
    cgpt_jax_busy_slots                           decode slots serving a request
    cgpt_jax_time_to_first_token_seconds          request arrival → first token (histogram)
    cgpt_jax_time_per_output_token_seconds        time between consecutive tokens of a request (histogram)
    cgpt_jax_request_latency_seconds              request arrival → last token (histogram)
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, queue_depth: Callable[[], float], busy_slots: Callable[[], float]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cgpt_jax_requests", "Requests answered.", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("cgpt_jax_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.completion_tokens = Counter("cgpt_jax_completion_tokens", "Tokens generated.", registry=r)
        Gauge("cgpt_jax_queue_depth", "Requests waiting for a decode slot.", registry=r).set_function(queue_depth)
        Gauge("cgpt_jax_busy_slots", "Decode slots serving a request.", registry=r).set_function(busy_slots)
        self.time_to_first_token = Histogram("cgpt_jax_time_to_first_token_seconds", "Arrival to first token.",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("cgpt_jax_time_per_output_token_seconds",
                                               "Time between consecutive tokens of a request.",
                                               buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("cgpt_jax_request_latency_seconds", "Arrival to last token.",
                                 buckets=_LATENCY_BUCKETS, registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)
