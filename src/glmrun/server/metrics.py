"""Prometheus metrics of one server, in a registry of its own (no module-level globals).

Counted as they happen: HTTP requests by endpoint and status; for every generation the scheduler
ends (cancelled ones included), time to first token, latency and finish reason. Read from the
scheduler at each scrape: prompt and generated tokens, queue depth, running requests, decode steps
and a histogram of decode-step batch sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..engine import GenerationResult
from ..scheduler import SchedulerStats

__all__ = ["ServerMetrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, float("inf"))
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, float("inf"))


class _SchedulerCollector(Collector):
    def __init__(self, stats: Callable[[], SchedulerStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        if s is None:  # before startup / after shutdown
            return
        yield GaugeMetricFamily("glmrun_queue_depth", "Requests waiting for a batch row", value=s.waiting)
        yield GaugeMetricFamily("glmrun_running_requests", "Requests holding a batch row", value=s.running)
        yield GaugeMetricFamily("glmrun_max_batch", "Batch rows (--max-batch)", value=s.max_batch)
        yield GaugeMetricFamily("glmrun_kv_cache_bytes", "Memory of the batch KV cache", value=s.cache_bytes)
        yield CounterMetricFamily("glmrun_prompt_tokens", "Prompt tokens prefilled", value=s.prefill_tokens)
        yield CounterMetricFamily("glmrun_generation_tokens", "Tokens generated", value=s.generated_tokens)
        yield CounterMetricFamily("glmrun_decode_steps", "Batched decode steps", value=s.decode_steps)
        finished = CounterMetricFamily(
            "glmrun_scheduler_finished", "Requests the scheduler ended, by finish reason", labels=["reason"]
        )
        for reason, count in sorted(s.finished.items()):
            finished.add_metric([reason], count)
        yield finished
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        bounds = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < s.max_batch] + [s.max_batch]
        sizes = sorted(s.batch_sizes.items())
        for bound in bounds:
            cumulative = sum(count for size, count in sizes if size <= bound)
            buckets.append((str(float(bound)), cumulative))
        buckets.append(("+Inf", cumulative))
        yield HistogramMetricFamily(
            "glmrun_batch_size",
            "Requests advanced together per decode step",
            buckets=buckets,
            sum_value=s.decode_tokens,
        )
        yield GaugeMetricFamily(
            "glmrun_worker_alive", "1 while the scheduler's worker thread runs", value=float(s.worker_alive)
        )


class ServerMetrics:
    """The server's metrics; ``render()`` is the body of ``GET /metrics``."""

    def __init__(self, stats: Callable[[], SchedulerStats | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "glmrun_requests", "HTTP requests answered, by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.finished = Counter(
            "glmrun_request_finished", "Generations ended, by finish reason", ["reason"], registry=r
        )
        self.ttft = Histogram(
            "glmrun_time_to_first_token_seconds",
            "From submission to the first generated token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "glmrun_request_latency_seconds", "From submission to the last token", buckets=_LATENCY_BUCKETS, registry=r
        )
        r.register(_SchedulerCollector(stats))

    def observe_result(self, result: GenerationResult) -> None:
        """Called on the scheduler's worker thread as each generation ends (prometheus_client is thread-safe)."""
        self.finished.labels(result.finish_reason).inc()
        if result.completion_tokens:
            self.ttft.observe(result.time_to_first_token)
        self.latency.observe(result.total_time)

    def observe_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
