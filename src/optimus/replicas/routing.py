"""The ingress's view of each replica and where the next request goes. Pure Python, no Ray.

Invariants:
- ``in_flight`` counts the requests this ingress has open on the replica (incremented before a
  request is sent, decremented once its stream ended, whatever the outcome), so it is never
  negative and, with one ingress, equals the replica's running + waiting up to in-flight news;
- a replica is routable only while ``up`` (its last status poll answered and said ready) and
  ``in_flight < capacity`` (its engine's ``max_running + max_waiting``): a request that no
  replica can take is refused at once (``QueueFullError`` -> 503 + Retry-After) instead of
  queueing somewhere unbounded;
- the choice is the least outstanding work, not round robin: ``max(reported queue depth,
  in_flight)`` (the replica's report covers work from other ingresses; ours is fresher), then
  KV usage, then the fewest requests routed so far (ties spread over replicas)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from optimus.core.errors import EngineDeadError, QueueFullError
from optimus.replicas.messages import ReplicaStatus


@dataclass(eq=False)
class ReplicaView:
    """What the ingress knows of one replica; ``handle`` is its Ray Serve deployment handle."""

    name: str  # the ``replica`` label of its metrics
    handle: object
    capacity: int  # max_running + max_waiting of its engine
    up: bool = False
    status: ReplicaStatus | None = None
    in_flight: int = 0
    routed: int = 0  # requests sent to it (retries included)
    lost: int = 0  # times the ingress saw it die or stop answering
    refused_until: float = 0.0  # after a queue_full refusal: skipped until then (monotonic)

    @property
    def reported_depth(self) -> int:
        return self.status.queue_depth if self.status is not None else 0

    @property
    def kv_usage(self) -> float:
        return self.status.metrics.kv_usage if self.status is not None else 0.0

    def outstanding(self) -> int:
        return max(self.reported_depth, self.in_flight)

    def key(self) -> tuple:
        return (self.outstanding(), self.kv_usage, self.routed, self.name)


@dataclass
class Router:
    replicas: list[ReplicaView] = field(default_factory=list)

    def pick(self, now: float, exclude: Iterable[ReplicaView] = ()) -> ReplicaView:
        """The routable replica with the least outstanding work; raises ``EngineDeadError``
        when no replica is up and ``QueueFullError`` when every one that is up is full."""
        skip = set(exclude)
        up = [r for r in self.replicas if r.up and r not in skip]
        if not up:
            raise EngineDeadError("no engine replica is running (the lost ones are being restarted)")
        open_ = [r for r in up if r.in_flight < r.capacity and r.refused_until <= now]
        if not open_:
            total = sum(r.in_flight for r in up)
            raise QueueFullError(f"every replica is full ({total} requests in flight over {len(up)} replicas)")
        return min(open_, key=ReplicaView.key)

    def up_count(self) -> int:
        return sum(1 for r in self.replicas if r.up)


def merged_metrics(views: Iterable[ReplicaView]):
    """One ``EngineMetrics`` over the replicas that are up: queues, steps and tokens summed, KV
    usage averaged (every replica has the same page count), no step start (each replica's
    health check watches its own steps)."""
    from optimus.engine.stats import EngineMetrics

    snaps = [v.status.metrics for v in views if v.up and v.status is not None]
    if not snaps:
        return EngineMetrics()
    chunks: dict[int, int] = {}
    for m in snaps:
        for size, count in m.chunk_size_counts.items():
            chunks[size] = chunks.get(size, 0) + count
    return EngineMetrics(
        running=sum(m.running for m in snaps), waiting=sum(m.waiting for m in snaps),
        kv_usage=sum(m.kv_usage for m in snaps) / len(snaps), steps=sum(m.steps for m in snaps),
        tokens_computed=sum(m.tokens_computed for m in snaps),
        tokens_committed=sum(m.tokens_committed for m in snaps), chunk_size_counts=chunks,
        last_step_started=None, last_step_latency_s=max(m.last_step_latency_s for m in snaps),
        step_latency_sum_s=sum(m.step_latency_sum_s for m in snaps),
        graph_capture_s=sum(m.graph_capture_s for m in snaps))
