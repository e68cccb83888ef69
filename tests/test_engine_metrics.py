"""The engine's metrics snapshot: what it carries, across the process boundary and to /metrics."""

from optimus.engine import wire
from optimus.engine.stats import EngineMetrics, EngineStats
from optimus.server.metrics import EngineCollector


class _Engine:
    ready = alive = True

    def __init__(self, snapshot: EngineMetrics) -> None:
        self._snapshot = snapshot

    def metrics(self) -> EngineMetrics:
        return self._snapshot


def test_graph_capture_time_reaches_the_wire_and_the_exposition():
    stats = EngineStats(steps=7, step_latency_sum_s=2.5, graph_capture_s=1.25, device_time_sum_s=2.0,
                        steps_in_flight=5)
    snapshot = EngineMetrics.of(stats, step_started=None)
    assert snapshot.graph_capture_s == 1.25 and snapshot.step_latency_sum_s == 2.5
    assert wire.metrics_from_wire(wire.unpack(wire.pack(wire.metrics_to_wire(snapshot)))) == snapshot
    values = {f.name: f.samples[0].value for f in EngineCollector(_Engine(snapshot)).collect() if f.samples}
    assert values["optimus_graph_capture_seconds"] == 1.25
    assert values["optimus_engine_step_seconds"] == 2.5 and values["optimus_engine_steps"] == 7
    assert values["optimus_engine_device_seconds"] == 2.0 and values["optimus_engine_steps_in_flight"] == 5
