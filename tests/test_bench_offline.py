"""The offline benchmark's code path, shrunk to tiny shapes on the CPU (no timing asserted)."""

import gc
import json
import weakref

import numpy as np
import pytest

from optimus.bench import offline
from optimus.cli import main


def test_bench_offline_tiny_smoke(tmp_path):
    GEN = 64  # two blocks of 32: the schedule, the policies and the medians, on a short answer
    acc = tmp_path / "acceptance.json"
    acc.write_text(json.dumps({"distribution": {"1": [1], "8": [2, 3], "32": [4, 6]}}))
    out = tmp_path / "offline.json"
    rc = main(["bench", "offline", "--device", "cpu", "--tiny", "--experiments", "schedule4,sweep",
               "--batches", "2", "--concurrency", "1,3", "--policies", "ar,fixed:8,elastic,elastic-shared,elastic-traced",
               "--acceptance", str(acc), "--profile", str(tmp_path / "profile.json"), "--out", str(out),
               "--repeats", "3", "--prompt-len", "64", "--gen-len", str(GEN)])
    assert rc == 0
    data = json.loads(out.read_text())
    row = data["schedule4"][0]
    assert row["output_tokens"] == 2 * GEN and row["tokens_committed"] == 2 * GEN
    assert row["steps"] >= GEN // 4  # 4 committed per step at most
    assert {r["policy"] for r in data["sweep"]} == {"ar", "fixed:8", "elastic", "elastic-shared", "elastic-traced"}
    ar = next(r for r in data["sweep"] if r["policy"] == "ar" and r["concurrency"] == 1)
    assert ar["steps"] >= GEN  # one token per step
    for r in data["sweep"]:  # each point: the median of three timed runs
        runs = sorted(r["output_tok_s_runs"])
        assert len(runs) == 3 and r["output_tok_s"] == runs[1]
        each = r["runs"]  # every run's steps and times, in run order
        assert len(each) == 3 and r["steps"] in [x["steps"] for x in each]
        assert [r["concurrency"] * GEN / x["wall_s"] for x in each] == pytest.approx(r["output_tok_s_runs"], rel=1e-3)
        trace = r["step_trace"]  # that run's steps, one entry each
        assert {len(v) for v in trace.values()} == {r["steps"]}
        for x in each:  # every run's own steps and chunk sizes
            assert {len(v) for v in x["step_trace"].values()} == {x["steps"]} and x["chunk_sizes"]
        assert sum(trace["rows"]) == r["tokens_computed"]
        assert max(trace["requests"]) <= r["concurrency"] and all(d >= 0 for d in trace["device_ms"])
        if r["policy"].startswith("elastic"):  # its beliefs after the load, one entry per size
            e = r["estimates"]
            assert e["sizes"][0] == 1 and len({len(v) for k, v in e.items() if k in ("tau", "rows", "tok_s")}) == 1
            rate = [r["concurrency"] * t / ((d + h) / 1e3) for t, d, h in zip(e["tau"], e["device_ms"], e["host_ms"])]
            assert e["tok_s"] == pytest.approx(rate, rel=1e-2)
        else:
            assert "estimates" not in r
        if r["policy"] == "elastic-traced":  # every decision of each run: all requests sized, every size priced
            assert len(r["decisions"]) == 3 and all(
                run and all(sum(d["sizes"].values()) == d["batch"] <= r["concurrency"]
                            and len(d["uniform_tok_s"]) == len(r["estimates"]["sizes"]) for d in run)
                for run in r["decisions"])
        else:
            assert "decisions" not in r
    assert (tmp_path / "policy_sweep.png").stat().st_size > 0


def test_bench_acceptance_measures_commits_per_chunk_on_the_default_model(tmp_path):
    out = tmp_path / "acceptance.json"
    rc = main(["bench", "acceptance", "--model", "default", "--tasks", "add3,copy", "--per-task", "2",
               "--max-tokens", "16", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    tau = {int(c): t for c, t in data["tau_per_chunk"].items()}
    assert sorted(tau) == [1, 2, 4, 8, 16, 32] and tau[1] == 1.0
    assert all(1.0 <= t <= c for c, t in tau.items())
    assert tau[32] > 2.0  # the shipped model commits several answer tokens per step at a full block
    steps = {int(c): sum(h.values()) for c, h in data["histograms"].items()}
    assert all(sum(int(k) * n for k, n in data["histograms"][str(c)].items()) / steps[c] == tau[c] for c in tau)
    # by_open splits the same steps by the masked positions m their window held: k <= m <= C.
    assert data["by_open"]["1"] == {"1": {"1": steps[1]}}
    for c, per in data["by_open"].items():
        assert sum(n for h in per.values() for n in h.values()) == steps[int(c)]
        assert all(1 <= int(k) <= int(m) <= int(c) for m, h in per.items() for k in h)


def test_sweep_policies_share_one_engine_and_elastic_shared_plans_on_the_shared_curve(tmp_path):
    from optimus.bench.timed_runs import Target
    from optimus.bench.policy_sweep import _policy

    llm = Target(device="cpu", tiny=True).llm("sdar-8b", "fixed:32", max_running=4, block_size=32)
    assert _policy(llm, "elastic").confidence is not None
    assert _policy(llm, "elastic-shared").confidence is None
    assert _policy(llm, "fixed:8").chunk == 8
    for name, corrected in (("elastic", True), ("elastic-profile", False)):  # steps twice the profile's time
        policy = _policy(llm, name)
        for n in range(1, 65):
            predict = policy.profile.predict_many
            policy.correction.observe(predict, n, 1, 2 * float(predict(np.array([n]), 1)[0]))
        assert (policy.correction.scale > 1.5) == corrected


def test_surface_frees_its_engine_before_releasing_memory(monkeypatch):
    """An experiment's engine (and its KV cache) must be gone when it empties the allocator's
    cache, or the next engine sizes its cache from what is left (the sweep then preempted)."""
    engines, alive_at_release = [], []
    make = offline.Target.llm

    def recording_llm(self, *args, **kwargs):
        llm = make(self, *args, **kwargs)
        engines.append(weakref.ref(llm.engine))
        return llm

    def recording_free(self):
        gc.collect()
        alive_at_release.extend(ref() is not None for ref in engines)

    monkeypatch.setattr(offline.Target, "llm", recording_llm)
    monkeypatch.setattr(offline.Target, "free_memory", recording_free)
    offline.run_surface(offline.Target("cpu", tiny=True), "sdar-8b", batches=(1,), chunks=(4,), context=16)
    assert alive_at_release == [False]


def test_a_device_curve_from_step_traces_replays_the_measured_steps():
    from optimus.bench.step_traces import profile_from_traces

    def row(rows, requests, ms):
        return {"step_trace": {"rows": rows, "requests": requests, "refresh_rows": [0] * len(rows), "device_ms": ms}}

    # Steps of 4 requests (64 and 128 rows) and of 60-64 requests (batch 64 after rounding).
    profile = profile_from_traces([row([64, 64, 64, 128], [4, 4, 4, 4], [7.0, 7.2, 7.1, 7.6]),
                                   row([256, 256, 512], [64, 60, 64], [11.0, 11.2, 15.0]), {"batch": 1}])
    assert profile.predict(64, batch=4) == pytest.approx(0.0071)  # the median of its steps
    assert profile.predict(128, batch=4) == pytest.approx(0.0076)
    assert profile.predict(512, batch=64) == pytest.approx(0.015)
    with pytest.raises(ValueError, match="no step traces"):
        profile_from_traces([{"batch": 1}])


def test_a_gpu_sweep_replays_on_the_cpu_against_its_step_traces(tmp_path):
    from optimus.bench.experiments import emulated_sweep
    from optimus.policy.elastic.latency import LatencyProfile

    # A "GPU" whose steps took 1 ms to 32 rows and 2 ms at 64, whatever the requests.
    trace = {"rows": [8, 16, 32, 64] * 2, "requests": [1, 1, 1, 1, 2, 2, 2, 2], "refresh_rows": [0] * 8,
             "device_ms": [1.0, 1.0, 1.0, 2.0] * 2}
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"sweep": [{"shape": "sdar-8b", "concurrency": 1, "step_trace": trace},
                                           {"shape": "sdar-8b", "concurrency": 2, "step_trace": trace}]}))
    plan = LatencyProfile.synthetic(0.001, 32, 0.001 / 32).save(tmp_path / "surface.json")
    out = tmp_path / "emulated.json"
    assert emulated_sweep.main([str(sweep), "--profile", str(plan), "--policies", "fixed:4,fixed:32,elastic",
                                "--acceptance", "tasks", "--prompt-len", "16", "--gen-len", "64", "--repeats", "1",
                                "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {(r["policy"], r["concurrency"]): r for r in data["rows"]}
    assert set(rows) == {(p, n) for p in ("fixed:4", "fixed:32", "elastic") for n in (1, 2)}
    assert set(rows[("fixed:4", 1)]["chunk_sizes"]) == {"4"}
    # The tasks regime commits 12 of a full window: whole blocks take a third of the steps.
    assert rows[("fixed:32", 1)]["steps"] < rows[("fixed:4", 1)]["steps"]
    assert rows[("fixed:32", 1)]["device_tok_s"] > rows[("fixed:4", 1)]["device_tok_s"]
    assert set(data["elastic_vs_best"]) == {"1", "2"} and all(v > 0 for v in data["elastic_vs_best"].values())


def test_the_cpu_replay_admits_prompts_within_the_gpu_sweeps_step_budget():
    from optimus.bench.experiments.emulated_sweep import run_policy
    from optimus.config import SchedulerConfig
    from optimus.policy.elastic.latency import LatencyProfile

    class Recording:  # the emulated device's curve, noting every step's rows
        def __init__(self):
            self.rows, self.curve = [], LatencyProfile.synthetic(0.001, 32, 0.001 / 32)

        def predict(self, rows, batch=1):
            self.rows.append(rows)
            return self.curve.predict(rows, batch=batch)

    device = Recording()
    run_policy("fixed:4", [256], device, device.curve, "sdar-8b", "tasks", prompt_len=64, gen_len=4, repeats=1)
    # 256 prompts of 64 rows are 16,384 rows: the GPU sweep's engine prefills them over four
    # steps of its default budget, not in one
    budget = SchedulerConfig().max_tokens_per_step
    assert max(device.rows) == budget and sum(r == budget for r in device.rows) >= 4


def _row(policy, tok_s):
    return {"policy": policy, "output_tok_s": tok_s}


def test_outgrown_leaves_out_only_larger_chunks_far_below_the_best():
    from optimus.bench.policy_sweep import outgrown

    rows = [_row("ar", 40), _row("fixed:2", 180), _row("fixed:8", 200), _row("fixed:16", 99), _row("fixed:32", 60),
            _row("elastic", 20), _row("fixed:32+auto", 10)]
    # below half of fixed:8 at a larger chunk: out; ar is further below, but its chunk is smaller
    # (a higher load moves the best toward it); elastic and composite names are never left out
    assert outgrown(rows, 0.5) == ["fixed:16", "fixed:32"]
    assert outgrown(rows, 0.25) == []
    assert outgrown([_row("elastic", 5)], 0.5) == []


def test_sweep_skips_outgrown_policies_at_higher_loads(monkeypatch):
    from optimus.bench import policy_sweep
    from optimus.bench.timed_runs import Target
    from optimus.decoding.replay import Acceptance

    speed = {"ar": 100, "fixed:8": 120, "fixed:32": 50}  # fixed:32 below half of fixed:8 at load 1
    ran = []

    def fake_run(llm, n, *args, **kwargs):
        name = llm.engine.policy.name
        ran.append((name, n))
        return {"output_tok_s": speed[name] * n, "graph_capture_s": 0.0, "steps": 1, "preemptions": 0,
                "cpu_ms_per_step": 0.0, "wall_over_device": 1.0, "wall_s": 8 / speed[name], "device_ms_per_step": 1.0,
                "chunk_sizes": {}, "step_trace": {}}

    monkeypatch.setattr(policy_sweep, "timed_generate", fake_run)
    acceptance = Acceptance({1: [1], 8: [2], 32: [4]})
    rows = policy_sweep.run_sweep(Target(device="cpu", tiny=True), "sdar-8b", ["ar", "fixed:8", "fixed:32"], [1, 2],
                                  acceptance, prompt_len=8, gen_len=8, repeats=1, drop_below=0.5)
    assert ("fixed:32", 1) in ran and ("fixed:32", 2) not in ran and ("ar", 2) in ran
    assert [(r["policy"], r["concurrency"]) for r in rows] == [("ar", 1), ("fixed:8", 1), ("fixed:32", 1),
                                                                 ("ar", 2), ("fixed:8", 2)]
    assert next(r for r in rows if r["policy"] == "fixed:32")["left_out_above"] == 1


def test_host_profile_profiles_each_policys_timed_runs(tmp_path):
    """The host profile experiment: the sweep's timed runs profiled per policy, and
    ``timed_generate`` restored after it."""
    from optimus.bench import policy_sweep, timed_runs
    from optimus.bench.experiments import host_profile

    assert host_profile.main(["--out", str(tmp_path), "--shape", "sdar-8b", "--concurrency", "1",
                              "--policies", "fixed:8,elastic", "--gen-len", "64", "--device", "cpu", "--tiny"]) == 0
    text = (tmp_path / "host_profile.txt").read_text()
    for name in ("FixedPolicy8", "ElasticPolicy"):
        assert f"===== {name}, by cumulative" in text and f"===== {name}, by tottime" in text
    # the policy's own work: its learning, and the next step planned while the device computes
    assert "engine.py" in text and "(observe)" in text and "(plan_ahead)" in text
    assert {r["policy"] for r in json.loads((tmp_path / "host_profile_sweep.json").read_text())["sweep"]} == {
        "fixed:8", "elastic"}
    assert policy_sweep.timed_generate is timed_runs.timed_generate


def test_host_profile_timers_split_each_step_into_phases(tmp_path):
    """``--timers``: per policy and load, the timed run's phases in ms per step (the warm-up's
    steps left out), adding up to no more than the whole step; the methods restored."""
    from optimus.bench.experiments import host_profile
    from optimus.executor import runner

    read = runner.GreedyPick.read
    assert host_profile.main(["--out", str(tmp_path), "--shape", "sdar-8b", "--concurrency", "2",
                              "--policies", "fixed:8,elastic", "--gen-len", "64", "--device", "cpu", "--tiny",
                              "--timers"]) == 0
    rows = json.loads((tmp_path / "host_phases.json").read_text())["rows"]
    assert [(r["policy"], r["concurrency"]) for r in rows] == [("fixed:8", 2), ("elastic", 2)]
    for r in rows:
        ms = r["ms_per_step"]
        assert ms["step"] > 0 and ms["schedule"] >= 0 and ms["choose"] > 0 and ms["build"] > 0
        inside = sum(v for k, v in ms.items() if k != "step")
        assert inside <= ms["step"] * 1.05 + 0.05  # phases nest inside the step, never overlap
    assert runner.GreedyPick.read is read
