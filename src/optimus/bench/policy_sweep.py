"""The offline policy sweep: every chunk policy on one engine across loads, acceptance replayed
(``optimus bench offline --experiments sweep``; module docstring of ``bench.offline``)."""

from __future__ import annotations

import math

from optimus.bench.decision_trace import DecisionTrace
from optimus.bench.timed_runs import Target, median_run, timed_generate
from optimus.core.params import SamplingParams, parse_policy_name
from optimus.decoding.replay import Acceptance, ReplayAcceptance
from optimus.engine.flight import pipeline_rule
from optimus.engine.llm import LLM
from optimus.policy.elastic.beliefs import uniform_beliefs
from optimus.policy.elastic.controller import ElasticPolicy

PIPELINED, AUTO_PIPELINED = "+pipeline", "+auto"
TRACED = "elastic-traced"  # elastic, its every decision recorded (bench.decision_trace)


def outgrown(rows: list[dict], fraction: float) -> list[str]:
    """The single fixed-size policies (``ar``, ``fixed:C``) among one load's sweep rows that a
    higher load need not run: below ``fraction`` of that load's best single policy, at a chunk
    larger than the best's. A higher load only moves the best size down (each step reaches the
    GPU's knee with fewer rows a request), so such a policy falls further behind there."""
    sizes = {r["policy"]: _fixed_size(r["policy"]) for r in rows}
    singles = [r for r in rows if sizes[r["policy"]] is not None]
    if not singles:
        return []
    best = max(singles, key=lambda r: r["output_tok_s"])
    return [r["policy"] for r in singles if sizes[r["policy"]] > sizes[best["policy"]]
            and r["output_tok_s"] < fraction * best["output_tok_s"]]


def _fixed_size(name: str) -> int | None:
    """The chunk size of ``ar`` (1) or ``fixed:C``; None for elastic and composite names."""
    try:
        kind, c = parse_policy_name(name)
    except ValueError:
        return None
    return c if kind in ("ar", "fixed") else None


def run_sweep(target: Target, shape: str, policies, concurrencies, acceptance: Acceptance, prompt_len=256,
              gen_len=256, profile_path: str | None = None, on_row=None,
              acceptance_path: str | None = None, repeats: int = 1, acceptance_name: str = "default model",
              drop_below: float | None = None) -> list[dict]:
    """Every policy on ONE engine (the same weights, graphs and replay), swapped in between
    runs and interleaved round by round, so clock and neighbour drift hit every policy alike:
    back-to-back runs of one policy spread by up to 30% on the H100 (docs/gpu.md). Each point
    is the median of ``repeats`` timed runs after one warm-up run per policy and concurrency.
    Each policy object lives through the whole sweep (elastic keeps what it learned, as in a
    server). ``acceptance_path`` (the profile the commits replay) seeds elastic's tau.
    ``drop_below``: after each load, the policies :func:`outgrown` names skip the higher loads
    (their last row says ``left_out_above``)."""
    params = SamplingParams(max_tokens=gen_len, ignore_eos=True)
    llm = target.llm(shape, "fixed:32", commit_rule=ReplayAcceptance(acceptance), max_running=max(concurrencies),
                     block_size=32, profile_path=profile_path, acceptance_profile=acceptance_path)
    controllers = {name: _policy(llm, name.removesuffix(PIPELINED).removesuffix(AUTO_PIPELINED)) for name in policies}
    traces = {name: DecisionTrace(controllers[name]) for name in policies if name == TRACED}
    rules = {name: _pipeline_rule(llm, name) for name in policies}  # each keeps what it learned
    rows, active = [], list(policies)
    for n in concurrencies:
        runs: dict[str, list[dict]] = {name: [] for name in active}
        for i in range(max(repeats, 1)):
            for name in active:
                llm.engine.use_policy(controllers[name])
                llm.engine.flights.pipeline = rules[name]
                if name in traces:
                    traces[name].start()  # the warm-up's decisions go with run 0
                runs[name].append(timed_generate(llm, n, prompt_len, gen_len, params, full_warmup=True,
                                                 warmup=i == 0, seed=i))
        load_rows = []
        for name in active:
            r = median_run(runs[name])
            r.update(shape=shape, policy=name, concurrency=n, acceptance=f"replayed ({acceptance_name})")
            if isinstance(controllers[name], ElasticPolicy):  # its beliefs after the load
                r["estimates"] = uniform_beliefs(controllers[name], n)
            if name in traces:  # every run's decisions, in run order
                r["decisions"], traces[name].runs = traces[name].runs[1:], [[]]
            print(f"  sweep {shape} {name:9s} conc={n:4d}: {r['output_tok_s']:.0f} tok/s "
                  f"(runs {', '.join(f'{x:.0f}' for x in r['output_tok_s_runs'])}; {r['graph_capture_s']:.2f} s "
                  f"of graph captures), {r['steps']} steps, {r['preemptions']} preemptions, cpu {r['cpu_ms_per_step']:.2f} "
                  f"ms/step, wall/device {r['wall_over_device']:.2f}",
                  flush=True)
            load_rows.append(r)
        for name in outgrown(load_rows, drop_below) if drop_below else ():
            next(r for r in load_rows if r["policy"] == name)["left_out_above"] = n
            active.remove(name)
            print(f"  sweep {shape} {name}: below {drop_below:g} of the best at {n} requests, left out above", flush=True)
        rows += load_rows
        if on_row:
            on_row(rows)
    del llm, controllers
    target.free_memory()
    return rows


def _pipeline_rule(llm: LLM, name: str):
    if name.endswith(PIPELINED):
        return pipeline_rule("2")
    if name.endswith(AUTO_PIPELINED):
        from optimus.policy.elastic.setup import load_or_profile
        profile = load_or_profile(llm.engine)
        return pipeline_rule("auto", profile.predict)
    return pipeline_rule("off")


def _policy(llm: LLM, name: str):
    """A fresh policy for ``llm``'s engine. "elastic-shared": elastic planning every request on
    the shared tau curve (no per-request confidence levels); "elastic-profile": elastic on its
    latency profile as measured, never corrected online (what the correction adds or costs);
    "elastic-traced": elastic, its decisions recorded (host time the others do not pay)."""
    from optimus.policy.elastic.setup import elastic_kwargs
    from optimus.policy.registry import make_policy

    if not name.startswith("elastic"):
        return make_policy(name)
    kwargs = elastic_kwargs(llm.engine)
    kwargs["per_request"] = name != "elastic-shared"
    kwargs["unit_steps_overlap"] = llm.engine.flights.overlaps_unit_steps
    policy = make_policy("elastic", **kwargs)
    if name == "elastic-profile":
        policy.correction.refit_every = math.inf  # the correction stays the identity
    return policy
