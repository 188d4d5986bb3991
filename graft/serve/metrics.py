"""Prometheus metrics of one server, in a registry of its own (two apps in a process never mix)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # no *_created series: one line per count, as scrapers expect

# forwards hold 1..hundreds of sequences; tokens per forward up to the token budget and beyond
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 65536)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "graft_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "graft_request_seconds", "Request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue = Gauge("graft_queue_size", "Requests waiting for the model", registry=r)
        self.in_flight = Gauge("graft_in_flight", "Requests admitted (queued or running)", registry=r)
        self.running = Gauge("graft_running_sequences", "Sequences in the decoding batch", registry=r)
        self.batch_size = Histogram(
            "graft_batch_size", "Sequences per forward", ["kind"], buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "graft_batch_tokens", "Real tokens per forward", ["kind"], buckets=TOKEN_BUCKETS, registry=r
        )
        self.time_to_first_token = Histogram(
            "graft_time_to_first_token_seconds",
            "From a sequence's arrival to its first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "graft_time_per_output_token_seconds",
            "A decoding step: the next token of every running sequence",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.generated = Counter("graft_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("graft_prompt_tokens", "Prompt tokens read", registry=r)
        self.prompt_tokens_cached = Counter(
            "graft_prompt_tokens_cached",
            "Prompt tokens whose keys and values the prefix cache held",
            registry=r,
        )

        self.answered: dict[tuple[str, str], tuple] = {}  # (endpoint, status) -> its two series

    def request(self, endpoint: str, status: str, seconds: float) -> None:
        """One request answered: its count and its latency. Each label's series is looked up once
        (prometheus_client's ``labels`` takes a lock and builds a key at every call)."""
        series = self.answered.get((endpoint, status))
        if series is None:
            series = self.answered[endpoint, status] = (
                self.requests.labels(endpoint, status),
                self.latency.labels(endpoint),
            )
        series[0].inc()
        series[1].observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
