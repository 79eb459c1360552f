"""Prometheus metrics of one server (own registry, so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# latency buckets from 1 ms to 2 minutes: per-token latencies on CPU and GPU, TTFT under load
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, engine, inflight):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sqdeploy_requests", "HTTP requests by route and status code", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("sqdeploy_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("sqdeploy_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("sqdeploy_sequences_finished", "Sequences finished, by reason", ["reason"], registry=r)
        waiting = Gauge("sqdeploy_queue_depth", "Sequences waiting for a batch slot", registry=r)
        waiting.set_function(lambda: engine.stats()["waiting"])
        running = Gauge("sqdeploy_running_sequences", "Sequences in the running batch", registry=r)
        running.set_function(lambda: engine.stats()["running"])
        active = Gauge("sqdeploy_inflight_sequences", "Sequences admitted by the server and not finished", registry=r)
        active.set_function(inflight)
        self.ttft = Histogram(
            "sqdeploy_time_to_first_token_seconds", "Arrival to first generated token", buckets=_LATENCY, registry=r
        )
        self.itl = Histogram(
            "sqdeploy_inter_token_latency_seconds", "Time between consecutive tokens of a sequence", buckets=_LATENCY, registry=r
        )
        self.e2e = Histogram(
            "sqdeploy_request_latency_seconds", "Arrival to last token of a sequence", buckets=_LATENCY, registry=r
        )
        self.queue_time = Histogram(
            "sqdeploy_queue_time_seconds", "Arrival to admission into the batch", buckets=_LATENCY, registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
