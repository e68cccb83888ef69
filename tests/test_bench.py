"""The serving load generator: metrics arithmetic, arrivals, datasets, Prometheus parsing, and
end-to-end runs against a fake OpenAI-compatible server that streams with known timings."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from optimus.bench.arrivals import arrival_times
from optimus.bench.client import RequestOptions, RequestResult
from optimus.bench.datasets import (
    BUILTIN_LINES, SHAREGPT_MEAN, DatasetSpec, SampleRequest, sample_requests, sharegpt_lengths,
)
from optimus.bench.metrics import SLO, compute_metrics, request_latencies_ms
from optimus.bench.prometheus import counter_deltas, dllm_summary, parse_prometheus
from optimus.bench.serve import LoadSpec, ServeBenchConfig, benchmark
from optimus.bench.server_process import free_port
from optimus.bench.sweep import SweepConfig, capacity, rejudge, run_sweep


# ---- a fake server with known timings ----------------------------------------------------
class FakeServer:
    """Streams ``max_tokens`` one-token frames: the first after ``ttft`` s, then one every ``gap`` s;
    counts steps/commits in Prometheus counters and tracks the most requests in flight."""

    def __init__(self, ttft: float = 0.05, gap: float = 0.02) -> None:
        self.ttft, self.gap = ttft, gap
        self.in_flight = self.max_in_flight = 0
        self.steps = self.committed = 0
        self.app = self._build()

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health():
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

        @app.get("/metrics")
        async def metrics():
            return PlainTextResponse(
                "# TYPE optimus_engine_steps counter\n"
                f"optimus_engine_steps_total {self.steps}.0\n"
                f"optimus_tokens_committed_total {self.committed}.0\n"
                f"optimus_positions_computed_total {4 * self.committed}.0\n"
                f'optimus_chunk_size_choices_total{{chunk_size="4"}} {self.steps}.0\n'
                "optimus_num_requests_running 0.0\nvllm_other_total 5.0\n")

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            return StreamingResponse(self._stream(body), media_type="text/event-stream")

        return app

    async def _stream(self, body: dict):
        n = body["max_tokens"]
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            for i in range(n):
                await asyncio.sleep(self.ttft if i == 0 else self.gap)
                self.steps += 1
                self.committed += 1
                finish = "length" if i == n - 1 else None
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': 'tok ', 'finish_reason': finish}]})}\n\n"
            usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.in_flight -= 1


@contextmanager
def running(app: FastAPI):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)


@pytest.fixture(scope="module")
def fake():
    server = FakeServer()
    with running(server.app) as url:
        server.url = url
        yield server


def _config(url: str, **load) -> ServeBenchConfig:
    return ServeBenchConfig(url, RequestOptions("fake-model", ignore_eos=True), LoadSpec(**load),
                            SLO(ttft_ms=5000), progress=False)


def _requests(n: int, out_len: int = 4) -> list[SampleRequest]:
    return [SampleRequest(f"prompt {i}", 3, out_len) for i in range(n)]


# ---- metrics arithmetic ---------------------------------------------------------------------
def test_compute_metrics_matches_hand_arithmetic():
    results = [
        RequestResult(True, 10, 5, ttft=0.1, itl=[0.05, 0.05], latency=0.5),  # tpot (0.5-0.1)/4 = 0.1
        RequestResult(True, 20, 3, ttft=0.3, itl=[0.2], latency=0.7),  # tpot 0.2
        RequestResult(True, 30, 1, ttft=0.2, itl=[], latency=0.2),  # one token: no tpot sample
        RequestResult(False, 40, 0, error="HTTP 500"),
    ]
    m = compute_metrics(results, duration_s=2.0, slo=SLO(ttft_ms=250, tpot_ms=150), percentiles=(50, 99))
    assert m["completed"] == 3 and m["failed"] == 1
    assert m["total_input_tokens"] == 60 and m["total_output_tokens"] == 9
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(4.5)
    assert m["total_token_throughput"] == pytest.approx(34.5)
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["mean_tpot_ms"] == pytest.approx(150.0)
    assert m["mean_itl_ms"] == pytest.approx(100.0)
    assert m["median_itl_ms"] == pytest.approx(50.0)
    assert m["mean_e2el_ms"] == pytest.approx(1400.0 / 3)
    assert m["p50_e2el_ms"] == pytest.approx(500.0)
    assert m["p99_ttft_ms"] == pytest.approx(np.percentile([100, 300, 200], 99))
    # good: #1 (ttft 100, tpot 100) and #3 (ttft 200, tpot counted as 0); #2 misses ttft; #4 failed
    assert m["request_goodput"] == pytest.approx(1.0)
    assert m["slo_attainment"] == pytest.approx(0.5)


def test_stored_latencies_judge_slos_like_the_live_metrics():
    results = [RequestResult(True, 1, 5, ttft=0.1, itl=[0.05] * 4, latency=0.5),
               RequestResult(True, 1, 3, ttft=0.3, itl=[0.2] * 2, latency=0.7),
               RequestResult(True, 1, 1, ttft=0.2, latency=0.2), RequestResult(False, 1, 0)]
    lat = request_latencies_ms(results)
    assert lat["ok"] == [True, True, True, False] and lat["tpot_ms"][:3] == [100.0, 200.0, 0.0]
    for slo in (SLO(ttft_ms=250, tpot_ms=150), SLO(ttft_ms=400), SLO(e2el_ms=300), SLO(tpot_ms=50)):
        assert slo.attainment(lat) == compute_metrics(results, 1.0, slo)["slo_attainment"]


def test_metrics_without_slo_report_no_goodput():
    m = compute_metrics([RequestResult(True, 1, 2, ttft=0.1, itl=[0.1], latency=0.2)], 1.0)
    assert m["request_goodput"] is None and m["slo_attainment"] is None
    assert m["mean_tpot_ms"] == pytest.approx(100.0)


def test_slo_parse():
    assert SLO.parse(["ttft:500", "tpot:50"]).as_dict() == {"ttft": 500.0, "tpot": 50.0}
    assert SLO.parse(["ttft:1,e2el:9"]).as_dict() == {"ttft": 1.0, "e2el": 9.0}
    for bad in (["ttft"], ["speed:3"], ["tpot:0"]):
        with pytest.raises(ValueError):
            SLO.parse(bad)


# ---- arrivals -------------------------------------------------------------------------------
@pytest.mark.parametrize("burstiness", [0.5, 1.0, 4.0])
def test_gamma_arrivals_have_the_requested_mean_and_spread(burstiness):
    t = arrival_times(20001, rate=4.0, burstiness=burstiness, seed=1)
    gaps = np.diff(t)
    assert t[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_arrivals_edge_cases():
    assert arrival_times(3, math.inf) == [0.0, 0.0, 0.0]
    assert arrival_times(3, 2.0, math.inf) == pytest.approx([0.0, 0.5, 1.0])
    assert arrival_times(5, 1.0, seed=3) == arrival_times(5, 1.0, seed=3)
    with pytest.raises(ValueError):
        arrival_times(3, 0.0)


# ---- datasets -------------------------------------------------------------------------------
class CharTokenizer:
    """One token per character (ids = code points below 128)."""

    vocab_size = 128
    all_special_ids = (0,)

    def encode(self, text):
        return [ord(c) % 128 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_random_dataset_lengths():
    reqs = sample_requests(DatasetSpec("random", 50, input_len=20, output_len=8, range_ratio=0.5), CharTokenizer())
    assert len(reqs) == 50
    assert all(4 <= r.expected_output_len <= 12 for r in reqs)
    assert all(r.prompt_len == len(r.prompt) and 1 <= r.prompt_len <= 30 for r in reqs)
    assert len({r.prompt for r in reqs}) == 50


def test_sharegpt_like_lengths_follow_the_published_means():
    import random
    rng = random.Random(0)
    lens = np.array([sharegpt_lengths(rng) for _ in range(20000)])
    assert lens[:, 0].min() >= 4 and lens[:, 0].max() <= 1024 and lens[:, 1].min() >= 4
    assert lens[:, 0].mean() == pytest.approx(SHAREGPT_MEAN["input"], rel=0.06)
    assert lens[:, 1].mean() == pytest.approx(SHAREGPT_MEAN["output"], rel=0.06)
    assert np.median(lens[:, 1]) < lens[:, 1].mean()  # right-skewed, as chat outputs are
    small = np.array([sharegpt_lengths(rng, 0.25) for _ in range(5000)])
    assert small[:, 1].mean() == pytest.approx(SHAREGPT_MEAN["output"] * 0.25, rel=0.08)


def test_text_dataset_falls_back_to_builtin_lines(tmp_path):
    reqs = sample_requests(DatasetSpec("text", 8, input_len=40, output_len=5, text_dir=str(tmp_path / "none")),
                           CharTokenizer())
    assert len(reqs) == 8 and all(r.expected_output_len == 5 and r.prompt_len <= 40 for r in reqs)
    assert all(any(r.prompt in line for line in BUILTIN_LINES) for r in reqs)


def test_tasks_dataset_asks_heldout_task_questions():
    from optimus_lab.evaluation.tasks import TASKS

    reqs = sample_requests(DatasetSpec("tasks", 2 * len(TASKS), output_len=32), CharTokenizer())
    assert len(reqs) == 2 * len(TASKS) and all(r.expected_output_len == 32 for r in reqs)
    assert all(r.prompt and r.prompt_len == len(r.prompt) for r in reqs)
    assert len({r.prompt for r in reqs}) > len(TASKS)  # varied questions, not one per task


def test_mixed_dataset_is_half_prose_half_chat_rendered_tasks(tmp_path):
    class ChatChars(CharTokenizer):
        def apply_chat_template(self, messages):
            return f"<user>{messages[0]['content']}<assistant>"

    reqs = sample_requests(DatasetSpec("mixed", 9, input_len=30, output_len=6, text_dir=str(tmp_path)), ChatChars())
    chats = [r for r in reqs if r.prompt.startswith("<user>") and r.prompt.endswith("<assistant>")]
    assert len(reqs) == 9 and len(chats) == 4 and all(r.expected_output_len == 6 for r in reqs)
    assert all(any(r.prompt in line for line in BUILTIN_LINES) for r in reqs if r not in chats)
    with pytest.raises(ValueError, match="chat template"):
        sample_requests(DatasetSpec("mixed", 4, text_dir=str(tmp_path)), CharTokenizer())


# ---- prometheus -----------------------------------------------------------------------------
def test_prometheus_parse_and_dllm_summary():
    before = parse_prometheus('optimus_engine_steps_total 10.0\noptimus_tokens_committed_total 20\n'
                              'optimus_chunk_size_choices_total{chunk_size="8"} 10\nother_total 3\n')
    after = parse_prometheus('# HELP x\noptimus_engine_steps_total 30.0\noptimus_tokens_committed_total 80\n'
                             'optimus_positions_computed_total 160\noptimus_num_requests_running 2\n'
                             'optimus_engine_step_seconds_total 0.5\noptimus_engine_device_seconds_total 0.4\n'
                             'optimus_engine_steps_in_flight_total 15\n'
                             'optimus_chunk_size_choices_total{chunk_size="8"} 25\n'
                             'optimus_chunk_size_choices_total{chunk_size="4"} 15\n')
    assert "other_total" not in before and after["optimus_num_requests_running"] == 2.0
    d = counter_deltas(before, after)
    assert "optimus_num_requests_running" not in d
    s = dllm_summary(d)
    assert s["steps"] == 20 and s["tokens_committed"] == 60 and s["tokens_per_step"] == 3.0
    assert s["token_efficiency"] == pytest.approx(60 / 160)
    assert s["chunk_size_share"] == {"4": 0.5, "8": 0.5} and s["mean_chunk_size"] == 6.0
    assert s["tau"] == pytest.approx(2.0)
    # 15 of the 20 steps stayed in flight; 0.5 s of steps, 0.4 s of it on the device
    assert s["steps_in_flight_share"] == 0.75 and s["mean_step_ms"] == pytest.approx(25.0)
    assert s["device_over_step_time"] == pytest.approx(0.8)


# ---- end to end against the fake server -----------------------------------------------------
def test_benchmark_against_fake_server_measures_known_timings(fake):
    fake.max_in_flight = 0
    result = asyncio.run(benchmark(_config(fake.url), _requests(6), len))
    assert result["completed"] == 6 and result["failed"] == 0
    assert result["total_output_tokens"] == 24 and result["total_input_tokens"] == 42  # from usage
    assert 40 <= result["mean_ttft_ms"] <= 400  # server waits 50 ms before the first frame
    assert 15 <= result["median_itl_ms"] <= 200  # then 20 ms per frame
    assert result["mean_e2el_ms"] >= result["mean_ttft_ms"] + 3 * 15
    assert len(result["itls"]) == 6 and all(len(g) == 3 for g in result["itls"])
    assert result["slo_attainment"] == 1.0
    assert result["dllm"]["steps"] == 24 and result["dllm"]["tokens_committed"] == 24
    assert result["dllm"]["token_efficiency"] == pytest.approx(0.25)
    assert fake.max_in_flight > 1  # rate inf: all six in flight together


def test_max_concurrency_caps_requests_in_flight(fake):
    fake.max_in_flight = 0
    result = asyncio.run(benchmark(_config(fake.url, max_concurrency=1), _requests(3, 2), len))
    assert result["completed"] == 3 and fake.max_in_flight == 1


def test_goodput_counts_only_requests_within_slo(fake):
    cfg = _config(fake.url)
    tight = ServeBenchConfig(cfg.base_url, cfg.options, cfg.load, SLO(ttft_ms=1.0), progress=False)
    result = asyncio.run(benchmark(tight, _requests(3, 2), len))
    assert result["completed"] == 3 and result["slo_attainment"] == 0.0 and result["request_goodput"] == 0.0


def test_request_rate_spreads_the_run(fake):
    result = asyncio.run(benchmark(_config(fake.url, request_rate=20.0, burstiness=math.inf), _requests(5, 1), len))
    assert result["duration"] >= 4 / 20.0  # the last request leaves 0.2 s after the first


def test_errors_are_recorded_not_raised():
    async def main():
        cfg = _config(f"http://127.0.0.1:{free_port()}")  # nothing listens there
        return await benchmark(cfg, _requests(2), len)
    result = asyncio.run(main())
    assert result["completed"] == 0 and result["failed"] == 2 and all(result["errors"])


def test_cli_bench_serve_writes_vllm_keys(fake, tmp_path):
    from optimus.cli import main
    from fixtures.checkpoints import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "sdar")
    out = tmp_path / "r.json"
    code = main(["bench", "serve", "--base-url", fake.url, "--tokenizer", str(ckpt), "--num-prompts", "3",
                 "--input-len", "8", "--output-len", "3", "--goodput", "ttft:5000", "tpot:5000",
                 "--disable-tqdm", "--out", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    for key in ("duration", "completed", "total_input_tokens", "total_output_tokens", "request_throughput",
                "request_goodput", "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms",
                "p99_ttft_ms", "mean_tpot_ms", "p99_itl_ms", "mean_e2el_ms", "input_lens", "output_lens",
                "ttfts", "itls", "errors", "model_id", "request_rate", "burstiness", "date"):
        assert key in r, key
    assert r["model_id"] == "fake-model" and r["request_rate"] == "inf" and r["completed"] == 3
    assert r["total_output_tokens"] == 9 and r["dllm"]["steps"] >= 9


# ---- sweep ----------------------------------------------------------------------------------
def test_capacity_is_the_highest_rate_meeting_the_target():
    runs = [{"request_rate": 1, "slo_attainment": 1.0}, {"request_rate": 2, "slo_attainment": 0.95},
            {"request_rate": 4, "slo_attainment": 0.5}, {"request_rate": 8, "slo_attainment": None}]
    assert capacity(runs, 0.9) == 2
    assert capacity(runs, 0.99) == 1
    assert capacity(runs[2:], 0.9) is None


def test_sweep_launches_each_policy_and_plots(tmp_path):
    from optimus.bench.plots import plot_sweep

    launched = []

    @contextmanager
    def launch(policy):
        launched.append(policy)
        yield f"http://fake/{policy}"

    def bench(url, rate):  # a synthetic server: 'fast' keeps its SLO up to rate 2, 'slow' up to 1
        limit = 2.0 if url.endswith("fast") else 1.0
        att = 1.0 if rate <= limit else 0.4
        return {"request_rate": rate, "output_throughput": 10 * min(rate, limit), "slo_attainment": att,
                "p99_ttft_ms": 100 * rate, "p99_tpot_ms": 10 * rate, "completed": 4, "dllm": {"tau": 2.0},
                "request_latencies_ms": {"ok": [True] * 4, "ttft_ms": [100 * rate] * 4,
                                         "tpot_ms": [10 * rate] * 4, "e2el_ms": [500 * rate] * 4}}

    cfg = SweepConfig(("slow", "fast"), (4.0, 1.0, 2.0), SLO(ttft_ms=250, tpot_ms=30))
    sweep = run_sweep(cfg, launch, bench, log=lambda line: None)
    assert launched == ["slow", "fast"]
    assert [r["request_rate"] for r in sweep["policies"]["fast"]["runs"]] == [1.0, 2.0, 4.0]
    assert sweep["policies"]["fast"]["capacity"] == 2.0 and sweep["policies"]["slow"]["capacity"] == 1.0
    looser = rejudge(sweep, SLO(ttft_ms=450), 0.9)  # judged again from the stored latencies
    assert looser["policies"]["slow"]["capacity"] == 4.0 and looser["slo_ms"] == {"ttft": 450.0}
    assert sweep["policies"]["slow"]["capacity"] == 1.0  # the original is left alone
    paths = plot_sweep(sweep, tmp_path)
    assert [p.name for p in paths] == ["throughput_vs_rate.png", "p99_latency_vs_rate.png",
                                       "slo_attainment_vs_rate.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000 for p in paths)


def test_sweep_config_requires_slos():
    with pytest.raises(ValueError):
        SweepConfig(("ar",), (1.0,), SLO())


def test_sweep_against_real_servers_on_a_tiny_checkpoint(tmp_path):
    """An `optimus serve` subprocess on a tiny SDAR checkpoint: health wait, streamed requests,
    the server's own dLLM counters, and a clean stop (one policy: each start costs seconds)."""
    from optimus.bench.serve import load_tokenizer
    from optimus.bench.server_process import ServerLaunch, served
    from fixtures.checkpoints import make_tiny_checkpoint

    ckpt = str(make_tiny_checkpoint(tmp_path / "ckpt", "sdar"))
    tok = load_tokenizer(None, ckpt)
    reqs = sample_requests(DatasetSpec("random", 3, input_len=8, output_len=6), tok)
    cfg = SweepConfig(("ar",), (50.0,), SLO(ttft_ms=60_000))

    def launch(policy):
        return served(ServerLaunch(ckpt, policy, ("--num-pages", "64", "--log-level", "warning"),
                                   startup_timeout_s=120, log_dir=tmp_path))

    def bench(url, rate):
        opts = RequestOptions(ckpt.rsplit("/", 1)[-1], ignore_eos=True)
        bench_cfg = ServeBenchConfig(url, opts, LoadSpec(rate), cfg.slo, progress=False)
        return asyncio.run(benchmark(bench_cfg, reqs, lambda t: len(tok.encode(t))))

    sweep = run_sweep(cfg, launch, bench, log=lambda line: None)
    for policy, res in sweep["policies"].items():
        run = res["runs"][0]
        assert run["completed"] == 3 and run["total_output_tokens"] == 18, (policy, run)
        assert run["dllm"]["tokens_committed"] >= 18 and run["dllm"]["steps"] > 0
        assert res["capacity"] == 50.0
    shares = sweep["policies"]["ar"]["runs"][0]["dllm"]["chunk_size_share"]
    assert shares == {"1": 1.0}  # policy ar: every request-step ran a chunk of 1


def test_step_profile_reads_its_cases():
    from optimus.bench.experiments.step_profile import parse_cases

    assert parse_cases("llada2-mini:ar:1:1,llada-8b:fixed:4:8:4") == (
        ("llada2-mini", "ar", 1, 1), ("llada-8b", "fixed:4", 8, 4))


def test_free_port_avoids_the_ports_the_kernel_hands_out_and_skips_a_taken_one():
    import random
    import socket

    from optimus.bench.server_process import QUIET_PORTS

    first = free_port(rng=random.Random(7))
    assert first in QUIET_PORTS
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", first))
        held.listen()
        second = free_port(rng=random.Random(7))  # the same draw: its first port is taken now
    assert second in QUIET_PORTS and second != first
