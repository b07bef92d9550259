"""Prometheus metrics of a serving engine: latency histograms, load gauges, outcome counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jds.engine.interface import ServingEngine
from jds.engine.request import FinishReason, RequestTimings

# Seconds, from a fast accelerator's TTFT to a slow CPU's end-to-end latency.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TRANSFER_BUCKETS = (1e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0)


def hit_rate(usage: tuple[int, int]) -> float:
    """The share of looked-up prompt positions a prefix cache held (0 before any lookup)."""
    queried, hits = usage
    return hits / queried if queried else 0.0


class Metrics:
    """One registry per server (not the global one), so several servers can live in one process."""

    def __init__(self, engine: ServingEngine):
        self.registry = CollectorRegistry()
        r = self.registry

        def histogram(name: str, doc: str, buckets=LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, doc, registry=r, buckets=buckets)

        self.ttft = histogram("jds_time_to_first_token_seconds", "Arrival to first token.")
        self.tpot = histogram("jds_time_per_output_token_seconds", "(end - first token) / (tokens - 1).")
        self.queue = histogram("jds_queue_seconds", "Arrival to prefill start.")
        self.prefill = histogram("jds_prefill_seconds", "Prefill start to first token.")
        self.transfer = histogram("jds_kv_transfer_seconds", "KV handoff to the decode devices.", TRANSFER_BUCKETS)
        self.e2e = histogram("jds_e2e_seconds", "Arrival to the last token.")
        self.requests = Counter("jds_requests", "Finished requests.", ["finish_reason"], registry=r)
        self.tokens = Counter("jds_generated_tokens", "Generated tokens.", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("jds_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.cached_tokens = Counter("jds_prompt_tokens_cached", "Prompt tokens whose KV the prefix cache held.", registry=r)
        self.rejected = Counter("jds_rejected_requests", "Requests refused before running.", ["code"], registry=r)
        Gauge("jds_slots_in_use", "Decode slots holding a request.", registry=r).set_function(lambda: engine.slot_usage()[0])
        Gauge("jds_slots_total", "Decode slots.", registry=r).set_function(lambda: engine.slot_usage()[1])
        Gauge("jds_kv_pages_used", "KV cache pages held by a request or kept by the prefix cache.", registry=r).set_function(lambda: engine.page_usage()[0])
        Gauge("jds_kv_pages_total", "KV cache pages.", registry=r).set_function(lambda: engine.page_usage()[1])
        Gauge("jds_prefill_kv_pages_used", "Pages of the prefill instances' prefix-cache pools in use.", registry=r).set_function(
            lambda: engine.prefill_page_usage()[0]
        )
        Gauge("jds_prefill_kv_pages_total", "Pages of the prefill instances' prefix-cache pools.", registry=r).set_function(
            lambda: engine.prefill_page_usage()[1]
        )
        Gauge("jds_prefix_cache_hit_rate", "Share of prompt positions looked up that the prefix cache held.", registry=r).set_function(
            lambda: hit_rate(engine.prefix_cache_usage())
        )
        Gauge("jds_waiting_requests", "Requests waiting for prefill.", registry=r).set_function(lambda: engine.num_waiting)
        Gauge("jds_running_requests", "Requests admitted and not finished.", registry=r).set_function(lambda: engine.num_running)

    def finished(self, reason: FinishReason, prompt_tokens: int, completion_tokens: int, timings: RequestTimings | None) -> None:
        self.requests.labels(reason).inc()
        self.tokens.labels(reason).inc(completion_tokens)
        self.prompt_tokens.inc(prompt_tokens)
        if timings is not None:
            self.cached_tokens.inc(timings.cached_tokens)
            self._observe(timings)

    def _observe(self, t: RequestTimings) -> None:
        for histogram, value in (
            (self.ttft, t.ttft),
            (self.tpot, t.tpot),
            (self.queue, t.queue),
            (self.prefill, t.prefill),
            (self.e2e, None if t.finished is None else t.finished - t.arrival),
        ):
            if value is not None:
                histogram.observe(value)
        if t.transfer_bytes:
            self.transfer.observe(t.transfer_seconds)
