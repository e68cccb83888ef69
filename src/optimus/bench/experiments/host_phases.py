"""Phase timers for the GPU policy sweep (``host_profile --timers``): per policy and load, the
milliseconds per step the host spends in each phase of a step, measured with wall clocks
around the engine's methods (no profiler: the steps keep their real pace).

Phases (``ms_per_step``): ``schedule`` (the plan, the policy's choice inside it: ``choose``),
``build`` (the batch's tensors), ``launch`` (the forward's launch beside its build), ``wait``
(the host blocked on the device for the step's tokens), ``commit`` (committing, beside the
wait), ``settle``, ``cursors``, ``outputs``, ``learning`` (the policy's observe, and its choice
for the next step where it plans ahead), and ``step``
(the whole ``Engine.step``). ``exposed_ms`` is the wall time per step the device did not
compute: what the host's critical path cost.
"""

from __future__ import annotations

import collections
import json
import operator

from optimus.bench.host_time import timed
from optimus.bench.timed_runs import timed_generate
from optimus.executor import runner as runner_module

# (attribute path from the engine, dotted, method, phase)
_WRAPPED = (("scheduler", "schedule", "schedule"), ("scheduler", "learn_and_plan_ahead", "learning"),
            ("scheduler", "complete_step", "cursors"), ("runner", "build", "build"), ("runner", "run", "run"),
            ("post", "commit_step", "commit_all"), ("post.settler", "settle_all", "settle"), ("", "_report", "outputs"),
            ("", "step", "step"))


class PhaseTimers:
    """Wraps ``timed_generate`` like ``host_profile.PolicyProfiles``: the timed run's phases
    (not its warm-up's) are kept under (policy, load)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = collections.defaultdict(float)
        self.rows: list[dict] = []
        self._engines: set[int] = set()

    def _install(self, engine) -> None:
        if id(engine) in self._engines:
            return
        self._engines.add(id(engine))
        for path, name, phase in _WRAPPED:
            owner = operator.attrgetter(path)(engine) if path else engine
            setattr(owner, name, self._timed(getattr(owner, name), phase))
        # The policy object changes between policies: its choice is timed on the scheduler's side.
        engine.scheduler._choose_chunks = self._timed(engine.scheduler._choose_chunks, "choose")

    def _timed(self, inner, phase: str):
        return timed(inner, self.totals, phase)

    def __call__(self, llm, batch: int, *args, **kwargs) -> dict:
        engine = llm.engine
        self._install(engine)
        generate, totals = llm.generate, self.totals
        calls: list[dict] = []

        def counted(*a, **kw):  # the last generate of a timed_generate is the timed one
            totals.clear()
            try:
                return generate(*a, **kw)
            finally:
                calls.append(dict(totals))
        read = runner_module.GreedyPick.read
        runner_module.GreedyPick.read = self._timed(read, "wait")
        llm.generate = counted
        try:
            result = timed_generate(llm, batch, *args, **kwargs)
        finally:
            llm.generate = generate
            runner_module.GreedyPick.read = read
        self.rows.append(self._row(engine, batch, result, calls[-1]))
        return result

    @staticmethod
    def _row(engine, batch: int, result: dict, t: dict) -> dict:
        steps = max(result["steps"], 1)
        ms = {k: 1e3 * v / steps for k, v in t.items()}
        phases = {"schedule": ms.get("schedule", 0.0) - ms.get("choose", 0.0), "choose": ms.get("choose", 0.0),
                  "build": ms.get("build", 0.0), "launch": ms.get("run", 0.0) - ms.get("build", 0.0),
                  "wait": ms.get("wait", 0.0), "commit": ms.get("commit_all", 0.0) - ms.get("wait", 0.0)}
        phases.update({k: ms.get(k, 0.0) for k in ("settle", "cursors", "outputs", "learning", "step")})
        policy = engine.scheduler.policy
        return {"policy": getattr(policy, "name", type(policy).__name__), "concurrency": batch,
                "steps": result["steps"], "output_tok_s": round(result["output_tok_s"], 1),
                "mean_step_ms": round(result["mean_step_ms"], 3), "device_ms_per_step": round(result["device_ms_per_step"], 3),
                "exposed_ms": round(1e3 * result["wall_s"] / steps - result["device_ms_per_step"], 3),
                "ms_per_step": {k: round(v, 4) for k, v in phases.items()}}

    def report(self) -> str:
        for row in self.rows:
            parts = ", ".join(f"{k} {v:.3f}" for k, v in row["ms_per_step"].items())
            print(f"{row['policy']:9s} {row['concurrency']:4d} requests: exposed {row['exposed_ms']:.3f} ms/step "
                  f"of {row['mean_step_ms']:.3f} (device {row['device_ms_per_step']:.3f}); {parts}", flush=True)
        return json.dumps({"bench": "host_phases", "rows": self.rows}, indent=1)
