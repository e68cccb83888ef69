"""The engine in its own process, as ``optimus serve`` runs it by default: a killed engine
process is replaced with its queue kept (and once no restart is left the server exits 1 with no
client left hanging), an abort crosses the boundary and frees the request's pages, two HTTP
front-ends share the port with summed metrics, model errors are one line and status 2, and
the wire format round-trips what it carries."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from fixtures import make_tiny_checkpoint
from optimus.core.outputs import CommitEvent, RequestStats
from optimus.core.params import SamplingParams
from optimus.engine import wire
from test_server_support import SRC, ServerProcess, harness_argv, serve_argv, sse_events

STEP_DELAY = 0.02  # every engine step takes at least this long: 100 tokens of 'ar' >= 2 s


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _metrics_when(url: str, ready, timeout: float = 2.0) -> str:
    """The first /metrics text that satisfies ``ready`` (snapshots lag the engine by up to
    0.1 s), or the last one read once ``timeout`` has passed."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(url + "/metrics").text
        if ready(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.02)


def _engine_pid(server: ServerProcess, epoch: int) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = re.search(rf"engine process (\d+) started \(epoch {epoch}\)", server.log())
        if m:
            return int(m.group(1))
        time.sleep(0.1)
    raise AssertionError(f"no engine process of epoch {epoch}:\n{server.log()}")


def _stream(url: str, body: dict, out: dict, key: str, first: threading.Event | None = None) -> None:
    try:
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            out[key + ".status"] = r.status_code
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if first is not None and line.startswith("data: {"):
                    first.set()
        out[key] = sse_events(lines)
    except httpx.HTTPError as exc:
        out[key] = exc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("procs") / "sdar", "sdar")


def test_a_killed_engine_is_replaced_with_its_queue_kept_then_the_server_exits_1(tiny, tmp_path):
    argv = harness_argv(tiny, 0.0, "--policy", "ar", "--num-pages", "64", "--max-running", "1",
                        "--engine-restarts", "1", step_delay=STEP_DELAY)
    with ServerProcess(argv, tmp_path / "server.log") as server:
        server.wait_healthy()
        out: dict = {}
        first = threading.Event()
        body = {"prompt": "the quick brown fox", "max_tokens": 100, "ignore_eos": True}
        running = threading.Thread(target=_stream, args=(server.url, body, out, "running", first))
        running.start()
        assert first.wait(30)
        # One running slot: this one waits in the queue, with no output yet, when the engine dies.
        queued = threading.Thread(target=_stream, args=(server.url, {**body, "max_tokens": 5}, out, "queued"))
        queued.start()
        time.sleep(0.5)
        os.kill(_engine_pid(server, 0), signal.SIGKILL)
        running.join(30)
        queued.join(60)
        assert out["running.status"] == 200 and out["running"][-1] == "[DONE]"
        assert out["running"][-2]["error"]["code"] == "engine_dead"  # it had output: it cannot resume
        done = [e for e in out["queued"] if isinstance(e, dict)]
        assert out["queued.status"] == 200 and out["queued"][-1] == "[DONE]", out["queued"]
        assert done[-1]["choices"][0]["finish_reason"] == "length" and not any("error" in e for e in done)
        assert httpx.get(server.url + "/health").json() == {"status": "ok"}
        # No restart left: the next death ends the server with status 1, and its client hears of it.
        threading.Thread(target=_stream, args=(server.url, body, out, "last", first := threading.Event())).start()
        assert first.wait(30)
        os.kill(_engine_pid(server, 1), signal.SIGKILL)
        assert server.proc.wait(30) == 1, server.log()
        deadline = time.monotonic() + 10
        while "last" not in out and time.monotonic() < deadline:
            time.sleep(0.1)
        last = out["last"]
        assert isinstance(last, Exception) or last[-2]["error"]["code"] == "engine_dead", last
    assert "Traceback" not in server.log(), server.log()


def test_a_hung_engine_process_is_killed_by_the_watchdog_and_no_client_hangs(tiny, tmp_path):
    argv = harness_argv(tiny, 0.0, "--policy", "ar", "--num-pages", "64", "--watchdog-timeout", "0.4",
                        "--engine-restarts", "0", step_delay=1.5)  # every step "hangs"
    with ServerProcess(argv, tmp_path / "server.log") as server:
        server.wait_healthy()
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=30)
        assert (r.status_code, r.json()["error"]["code"]) == (503, "engine_dead")
        assert server.proc.wait(30) == 1, server.log()
    assert "killing the engine process" in server.log() and "watchdog" in server.log()


def test_the_engine_stays_in_the_server_process_on_request(tiny, tmp_path):
    argv = serve_argv(tiny, "--no-engine-process", "--policy", "fixed:4", "--num-pages", "64")
    with ServerProcess(argv, tmp_path / "server.log") as server:
        server.wait_healthy()
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 5, "ignore_eos": True},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
    assert "engine process" not in server.log()


def test_an_abort_crosses_the_boundary_and_frees_the_pages(tiny, tmp_path):
    argv = harness_argv(tiny, 0.0, "--policy", "ar", "--num-pages", "64", step_delay=0.05)
    with ServerProcess(argv, tmp_path / "server.log") as server:
        server.wait_healthy()
        body = {"prompt": "the quick brown fox", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()  # held: a dropped iterator may close the connection early
            next(line for line in lines if line.startswith("data: {"))
            busy = _metrics_when(server.url, lambda t: _metric(t, "optimus_kv_cache_usage_ratio") > 0)
        t0 = time.monotonic()
        while True:
            text = httpx.get(server.url + "/metrics").text
            if _metric(text, "optimus_kv_cache_usage_ratio") == 0 or time.monotonic() - t0 > 5:
                break
            time.sleep(0.05)
        assert _metric(busy, "optimus_kv_cache_usage_ratio") > 0, busy
        assert _metric(text, "optimus_kv_cache_usage_ratio") == 0 and _metric(text, "optimus_num_requests_running") == 0
        assert time.monotonic() - t0 < 2.0  # a few steps of 50 ms, and metrics 0.1 s old at most
        assert _metric(text, "optimus_requests_finished_total", '{finish_reason="abort"}') == 1


def test_two_front_ends_share_the_port_and_sum_their_metrics(tiny, tmp_path):
    argv = serve_argv(tiny, "--policy", "fixed:4", "--num-pages", "256", "--front-ends", "2", "--max-running", "32")
    with ServerProcess(argv, tmp_path / "server.log") as server:
        server.wait_healthy()
        out: dict = {}
        body = {"prompt": "hello", "max_tokens": 6, "ignore_eos": True, "stream_options": {"include_usage": True}}
        threads = [threading.Thread(target=_stream, args=(server.url, body, out, f"s{i}")) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for i in range(24):
            events = out[f"s{i}"]
            assert out[f"s{i}.status"] == 200 and events[-1] == "[DONE]", events
            assert events[-2]["usage"]["completion_tokens"] == 6
        scrapes = [httpx.get(server.url + "/metrics").text for _ in range(8)]  # new connections: both front-ends
        for text in scrapes:
            assert _metric(text, "optimus_generation_tokens_total") == 24 * 6
            assert _metric(text, "optimus_requests_finished_total", '{finish_reason="length"}') == 24
            per_frontend = [_metric(text, "optimus_frontend_calls_total", f'{{frontend="{i}"}}') for i in (0, 1)]
            assert sum(per_frontend) == 24 and min(per_frontend) > 0, per_frontend
        assert "2 HTTP front-end processes" in server.log()
        assert len(re.findall(r"ready: ", server.log())) == 1
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0, server.log()
    assert "Traceback" not in server.log(), server.log()


def _serve_once(model) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-m", "optimus.cli", "serve", "--model", str(model), "--device", "cpu",
                           "--port", "0"], capture_output=True, text=True, env=env, timeout=120)


def test_model_errors_are_one_line_and_status_2(tmp_path):
    missing = _serve_once(tmp_path / "nowhere")  # found missing before any process starts
    corrupt = make_tiny_checkpoint(tmp_path / "corrupt", "sdar")
    (corrupt / "model.safetensors").write_bytes(b"garbage" * 10)
    broken = _serve_once(corrupt)  # found while the engine process loads it
    for proc, start in ((missing, f"model directory not found: {tmp_path / 'nowhere'}"),
                        (broken, f"corrupt weight file {corrupt / 'model.safetensors'}")):
        assert proc.returncode == 2, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith(f"optimus serve: error: {start}"), proc.stderr
        assert "Traceback" not in proc.stderr


def test_the_wire_round_trips_params_stats_and_events():
    params = SamplingParams(max_tokens=7, temperature=0.5, stop=("##", "END"), stop_token_ids=(3,), seed=2**62,
                            policy="fixed:4", rule="factor", factor=0.7)
    fields = wire.unpack(wire.pack([wire.params_to_wire(params)]))[0]
    assert wire.params_from_wire(fields) == params
    assert wire.params_to_wire(SamplingParams()) == {}  # defaults stay off the wire
    stats = RequestStats(arrival_time=1.5, first_scheduled_time=2.0, steps=3, chunk_sizes={4: 2, 1: 1},
                         chunk_history=[4, 4, 1])
    back = RequestStats()
    wire.stats_into(back, wire.unpack(wire.pack([wire.stats_to_wire(stats)]))[0])
    assert back == stats
    events = (CommitEvent(5, 0, 4, (0, 2), (11, 12)),)
    assert tuple(wire.events_from_wire(wire.unpack(wire.pack(wire.events_to_wire(events))))) == events
