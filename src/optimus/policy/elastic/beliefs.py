"""What an elastic controller currently believes, as a benchmark reports it beside the sizes
it chose (to tell a wrong belief from a wrong decision)."""

from __future__ import annotations

import numpy as np

from optimus.policy.elastic.controller import ElasticPolicy


def uniform_beliefs(policy: ElasticPolicy, batch: int) -> dict:
    """For ``batch`` requests all at one size C: tau, the rows such a step runs, the device
    time the controller predicts for them, the host time around it, and the committed tokens
    per second that implies; with the state behind them."""
    sizes = np.array(policy.chunk_sizes, dtype=float)
    tau = policy._tau(sizes)
    rows = batch * (sizes + policy._rows_per_commit() * tau)
    device = policy.predict_latency(rows, batch)
    host = policy._host_s(rows, sizes == 1)
    return {"sizes": sizes.astype(int).tolist(), "tau": tau.round(3).tolist(), "rows": rows.round(1).tolist(),
            "device_ms": (device * 1e3).round(3).tolist(), "host_ms": (host * 1e3).round(3).tolist(),
            "tok_s": (batch * tau / (device + host)).round(1).tolist(),
            # the host-share line h(n) = a + b n: a in ms, b in us per row
            "host_share_ms": [round(policy.host.intercept * 1e3, 4), round(policy.host.slope * 1e6, 4)],
            "overhead_ms": round(policy.overhead_s * 1e3, 4),
            "correction": [round(policy.correction.scale, 4), round(policy.correction.stretch, 4)],
            # measured / profiled latency of the graph buckets it prices by what they measured
            "bucket_ratios": {int(b): round(r, 4) for b, r in sorted(policy.memory.known().items())}}
