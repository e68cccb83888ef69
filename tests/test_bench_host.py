"""``optimus bench host``: the host work of a step at many requests with the device left out."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from optimus.bench.host_time import PHASES, measure
from optimus.cli import main


def test_host_bench_times_every_phase_of_full_batch_steps():
    row = measure("fixed:4", "sdar-8b", requests=8, prompt_len=32, output_len=32, acceptance="real-8b")
    ms = row["full_batch_ms"]
    assert row["full_batch_steps"] > 0 and set(ms) == {"total", "critical", *PHASES}
    assert all(ms[k] > 0 for k in PHASES)
    assert ms["total"] >= 0.9 * sum(ms[k] for k in PHASES)  # the phases run inside the step
    assert ms["critical"] < ms["total"]  # the policy's learning is off the critical path
    # real-8b commits 1.5-1.6 tokens per window of 4: 8 requests commit about 12 a step
    assert 8 <= row["tokens_per_step"] <= 8 * 4


def test_host_bench_command_saves_its_rows(tmp_path, capsys):
    out = tmp_path / "host.json"
    assert main(["bench", "host", "--requests", "4", "--prompt-len", "16", "--output-len", "16",
                 "--policies", "ar", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["rows"][0]["policy"] == "ar" and saved["rows"][0]["tokens_per_step"] <= 4
    assert "ms/step at a full batch" in capsys.readouterr().out


def test_emulated_steps_queue_one_after_another_and_picks_wait_for_their_step():
    import time

    import torch

    from optimus.engine.emulated import EmulatedDevice
    from optimus.policy.elastic.latency import LatencyProfile

    device = EmulatedDevice(LatencyProfile.synthetic(0.2, 64, 0.0), vocab=1000, hidden=8)
    batch = SimpleNamespace(input_ids=torch.zeros(4, dtype=torch.long), cache_lens=torch.zeros(2))
    t0 = time.perf_counter()
    first_hidden = device.forward(batch)
    first = device.last_span
    device.forward(batch)
    second = device.last_span
    assert time.perf_counter() - t0 < 0.1  # enqueueing does not wait for the 0.2 s steps
    assert first_hidden.shape == (4, 8)
    assert first[1] - first[0] == pytest.approx(0.2) and second[0] == pytest.approx(first[1])  # queued behind
    pick = device.greedy(first_hidden)
    tokens, conf = pick.read()
    assert time.perf_counter() >= second[1] and tokens.shape == conf.shape == (4,)
    assert device.busy_s == pytest.approx(0.4)


def test_overlap_bench_reports_wall_against_device_time():
    from optimus.bench.host_time import measure_overlap

    for pipeline, suffix in (("off", ""), ("4", "+pipeline"), ("auto", "+auto")):
        row = measure_overlap("fixed:4", "sdar-8b", requests=8, prompt_len=16, output_len=32, acceptance="real-8b",
                              pipeline=pipeline)
        assert row["policy"] == "fixed:4" + suffix
        assert row["steps"] > 0 and row["device_s"] > 0
        # the device is never busier than the wall clock that contains it
        assert row["wall_over_device"] >= 0.99 and row["output_tok_s"] > 0


def test_emulated_serving_tells_steps_kept_in_flight_from_wide_ones():
    from optimus.bench.experiments.emulated_serving import serve
    from optimus.policy.elastic.latency import LatencyProfile

    device = LatencyProfile.synthetic(0.002, 256, 1e-5)
    ar = serve("ar", 400.0, device, requests=6, prompt_len=16, output_len=32)
    wide = serve("fixed:4", 400.0, device, requests=6, prompt_len=16, output_len=32)
    # one open position per window: commits known at launch, steps stay in flight
    assert ar["plans_with_a_wide_window"] == 0 and ar["steps_kept_in_flight"] > 0.9
    # windows of 4 with open positions: the next plan waits for this step's tokens
    assert wide["plans_with_a_wide_window"] > 0.5 and wide["steps_kept_in_flight"] < ar["steps_kept_in_flight"]
    for row in (ar, wide):
        assert row["output_tok_s"] > 0 and 0 < row["device_busy_share"] <= 1.0 + 1e-9 and row["mean_tpot_ms"] > 0
    assert wide["steps"] < ar["steps"]  # real-8b commits more than one token a window of 4
    # elastic planning on a curve of its own while the device follows another (a card's traces)
    slow = LatencyProfile.synthetic(0.004, 256, 2e-5)
    planned = serve("elastic", 400.0, slow, requests=6, prompt_len=16, output_len=32, plan=device)
    assert planned["output_tok_s"] > 0 and planned["wall_ms_per_step"] >= 3.9  # each step takes the device's 4 ms


def test_an_engine_configured_to_emulate_a_device_steps_at_its_surface_pace(tmp_path):
    import time

    from optimus.config import engine_config
    from optimus.core.params import SamplingParams
    from optimus.engine.engine import Engine
    from optimus.policy.elastic.latency import LatencyProfile

    surface = LatencyProfile.synthetic(0.02, 64, 0.0).save(tmp_path / "surface.json")  # 20 ms a step
    config = engine_config(model="random-tiny:sdar-8b", device="cpu", dtype="float32", policy="fixed:4",
                           num_pages=64, replay_acceptance="real-8b", emulate_device=str(surface))
    engine = Engine(config)
    for i in range(2):
        engine.add_request(str(i), list(range(100, 116)), SamplingParams(max_tokens=8, ignore_eos=True))
    t0, finished = time.perf_counter(), []
    while engine.has_work():
        finished += [o for o in engine.step() if o.finished]
    wall = time.perf_counter() - t0
    assert sorted(len(o.token_ids) for o in finished) == [8, 8]
    steps = engine.stats.steps
    assert engine.emulated.busy_s == pytest.approx(0.02 * steps) and wall >= 0.02 * steps
