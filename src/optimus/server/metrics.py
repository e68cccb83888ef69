"""Prometheus metrics of one app, in its own registry (never the process-global one).

Request-side series (token counters, TTFT, inter-token, end-to-end and queue-time histograms)
are observed by the server as outputs stream; engine-side series (running/waiting, KV usage,
steps, positions computed, tokens committed, chosen chunk sizes) are read from
``engine.metrics()`` at scrape time by a collector. An engine made of replicas
(``replicas/client.py``) also offers ``replica_metrics()``: its engine series are then summed
over the replicas and repeated per replica as ``optimus_replica_*{replica}``."""

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3,
                      0.4, 0.5, 0.75, 1.0, 2.5, 5.0)


class EngineCollector:
    """Reads one ``EngineMetrics`` snapshot per scrape; zeros while the engine is not up."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def describe(self):
        return []  # values only exist at scrape time; skip registration-time collection

    def collect(self):
        m = self._snapshot()
        gauges = {
            "optimus_num_requests_running": ("requests decoding in the engine", m and m.running),
            "optimus_num_requests_waiting": ("requests queued in the engine", m and m.waiting),
            "optimus_kv_cache_usage_ratio": ("fraction of KV pages in use (0..1)", m and m.kv_usage),
            "optimus_engine_ready": ("1 while the model is loaded and the loop runs",
                                     int(bool(getattr(self._engine, "ready", False)
                                              and getattr(self._engine, "alive", False)))),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=float(value or 0))
        counters = {
            "optimus_engine_steps": ("forward steps run", m and m.steps),
            "optimus_positions_computed": ("canvas positions run through the model", m and m.tokens_computed),
            "optimus_tokens_committed": ("canvas positions that received their final token",
                                         m and m.tokens_committed),
            "optimus_engine_step_seconds": ("wall time of the engine's steps (/ steps: the mean step)",
                                            m and m.step_latency_sum_s),
            "optimus_graph_capture_seconds": ("one-time CUDA-graph captures, inside the step wall time",
                                              m and m.graph_capture_s),
            "optimus_engine_device_seconds": ("the steps' time on the device (forward and pick)",
                                              m and m.device_time_sum_s),
            "optimus_engine_steps_in_flight": ("steps left running on the device while the next was planned",
                                               m and m.steps_in_flight),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=float(value or 0))
        chunks = CounterMetricFamily("optimus_chunk_size_choices",
                                     "request-steps run at each chosen chunk size", labels=["chunk_size"])
        for size, count in sorted((m.chunk_size_counts if m else {}).items()):
            chunks.add_metric([str(size)], float(count))
        yield chunks
        if hasattr(self._engine, "replica_metrics") and getattr(self._engine, "ready", False):
            yield from _replica_families(self._engine)

    def _snapshot(self):
        if not getattr(self._engine, "ready", False):
            return None
        try:
            return self._engine.metrics()
        except Exception:  # a dead engine must not break the scrape
            return None


_REPLICA_GAUGES = {  # name -> (doc, value of a ReplicaSample)
    "optimus_replica_up": ("1 while the replica answers and its engine is ready", lambda r: int(r.up)),
    "optimus_replica_num_requests_running": ("requests decoding in the replica", lambda r: r.metrics.running),
    "optimus_replica_num_requests_waiting": ("requests queued in the replica", lambda r: r.metrics.waiting),
    "optimus_replica_kv_cache_usage_ratio": ("fraction of the replica's KV pages in use", lambda r: r.metrics.kv_usage),
    "optimus_replica_requests_in_flight": ("requests the ingress has open on the replica", lambda r: r.in_flight),
}
_REPLICA_COUNTERS = {
    "optimus_replica_requests_routed": ("engine requests the ingress sent to the replica", lambda r: r.routed),
    "optimus_replica_engine_steps": ("forward steps the replica ran (since it last started)", lambda r: r.metrics.steps),
    "optimus_replica_lost": ("times the ingress saw the replica die or stop answering", lambda r: r.lost),
}


def _replica_families(engine):
    """Per-replica series (label ``replica``) and the ingress's retry counter."""
    samples = engine.replica_metrics()
    for table, kind in ((_REPLICA_GAUGES, GaugeMetricFamily), (_REPLICA_COUNTERS, CounterMetricFamily)):
        for name, (doc, value) in table.items():
            family = kind(name, doc, labels=["replica"])
            for sample in samples:
                family.add_metric([sample.name], float(value(sample)))
            yield family
    yield CounterMetricFamily("optimus_replica_retries", "requests sent again to another replica after theirs "
                              "was lost before any output", value=float(getattr(engine, "retries", 0)))


class ServerMetrics:
    def __init__(self, engine) -> None:
        self._engine = engine
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.prompt_tokens = Counter("optimus_prompt_tokens", "prompt tokens of admitted engine requests", registry=r)
        self.generation_tokens = Counter("optimus_generation_tokens", "tokens returned to clients", registry=r)
        self.finished = Counter("optimus_requests_finished", "engine requests by finish reason",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("optimus_requests_rejected", "API calls refused, by error code",
                                ["code"], registry=r)
        self.ttft = Histogram("optimus_time_to_first_token_seconds", "arrival to first committed token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("optimus_inter_token_latency_seconds",
                             "per token: gap between output deltas / tokens in the delta",
                             buckets=_TOKEN_GAP_BUCKETS, registry=r)
        self.e2e = Histogram("optimus_e2e_request_latency_seconds", "arrival to finish",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("optimus_request_queue_time_seconds", "engine arrival to first scheduled",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.frontend_calls = Counter("optimus_frontend_calls", "API calls each HTTP front-end process served",
                                      ["frontend"], registry=r)
        r.register(EngineCollector(engine))

    def render(self) -> bytes:
        """This app's series; with several front-end processes (``PROMETHEUS_MULTIPROC_DIR`` set
        before the import) the request-side series summed over all of them."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR") is None:
            return generate_latest(self.registry)
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry)
        registry.register(EngineCollector(self._engine))
        return generate_latest(registry)

    def tracker(self, prompt_len: int, start: float | None = None) -> "RequestTracker":
        return RequestTracker(self, prompt_len, time.monotonic() if start is None else start)


class RequestTracker:
    """Observes one engine request's latencies from its cumulative outputs."""

    def __init__(self, metrics: ServerMetrics, prompt_len: int, start: float) -> None:
        self._m = metrics
        self._prompt_len = prompt_len
        self._start = start
        self._last = start
        self._seen = 0
        self._done = False
        self._submitted = False

    def submitted(self) -> None:
        """Handed to the engine: from here it ends as finished or as an abort."""
        self._submitted = True

    def refused(self) -> None:
        self._submitted = False

    def failed(self) -> None:
        """The engine ended the request with an internal error."""
        if not self._done:
            self._done = True
            self._m.finished.labels("error").inc()

    def admitted(self) -> None:
        self._m.prompt_tokens.inc(self._prompt_len)

    def on_output(self, output) -> None:
        now = time.monotonic()
        new = len(output.token_ids) - self._seen
        if new > 0:
            if self._seen == 0:
                self._m.ttft.observe(now - self._start)
            else:
                gap = (now - self._last) / new
                for _ in range(new):
                    self._m.itl.observe(gap)
            self._seen, self._last = len(output.token_ids), now
        if output.finished:
            self._finish(output, now)

    def abandoned(self) -> None:
        """The caller left (disconnect, error) before the request finished; a request still
        waiting for its first output counts too, its engine request is aborted all the same."""
        if self._submitted and not self._done:
            self._done = True
            self._m.finished.labels("abort").inc()

    def _finish(self, output, now: float) -> None:
        if self._done:
            return
        self._done = True
        self._m.e2e.observe(now - self._start)
        self._m.generation_tokens.inc(len(output.token_ids))
        self._m.finished.labels(output.finish_reason or "unknown").inc()
        stats = output.stats
        arrival, scheduled = getattr(stats, "arrival_time", None), getattr(stats, "first_scheduled_time", None)
        if arrival and scheduled is not None and scheduled >= arrival:
            self._m.queue_time.observe(scheduled - arrival)
