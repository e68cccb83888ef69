"""What elastic believed at each decision of a timed run (the sweep's ``elastic-traced``).

The sweep row's ``estimates`` show the controller's beliefs after a load, with its tail of a
few requests behind them; a controller that chose a worse size in the steady state may hold
sound beliefs by then. This records, at every allocation: the requests and their confidence
levels, the sizes chosen, the plan's predicted rate, and the controller's predicted rate of
every uniform size at that batch (``beliefs.uniform_beliefs``), with the state behind it (the
prefill load per commit and its spread, the host line, the latency correction). Recording
costs host time on the traced steps, so a traced policy's rate is not a benchmark number.
"""

from __future__ import annotations

import numpy as np

from optimus.policy.elastic.beliefs import uniform_beliefs


class DecisionTrace:
    """Wraps one ``ElasticPolicy`` instance's allocation; ``runs`` holds, per run begun with
    :meth:`start`, one dict per decision."""

    def __init__(self, policy) -> None:
        self.policy, self.runs = policy, [[]]
        allocate = policy._allocate

        def traced(view, requests, ids, levels, pinned):
            sizes = allocate(view, requests, ids, levels, pinned)
            self._record(len(view.requests), sizes, levels)
            return sizes

        policy._allocate = traced

    def start(self) -> None:
        self.runs.append([])

    def _record(self, batch: int, sizes: list[int], levels: list[float]) -> None:
        p, plan = self.policy, self.policy.last_plan
        beliefs = uniform_beliefs(p, batch)
        chosen = np.bincount(np.asarray(sizes, dtype=int)) if sizes else np.zeros(1, dtype=int)
        self.runs[-1].append({
            "batch": batch, "sizes": {int(c): int(k) for c, k in enumerate(chosen) if k},
            "levels": np.quantile(levels, [0, 0.25, 0.5, 0.75, 1]).round(3).tolist() if levels else [],
            "target": plan.target_positions, "positions": plan.positions, "retargeted": plan.retargeted,
            "plan_ms": round(plan.predicted_latency_s * 1e3, 3), "plan_tok_s": round(plan.predicted_rate, 1),
            "uniform_tok_s": beliefs["tok_s"], "per_commit": round(p.load.per_commit, 3),
            "extra_sd": round(float(np.sqrt(p.load.extra_var)), 1), "host_share_ms": beliefs["host_share_ms"],
            "correction": beliefs["correction"]})
