"""A real server process over the real engine through its life: health 503 while the model loads,
an overload burst against a tiny queue, SIGTERM drain then abort, exit code 0; and the plain
``optimus serve`` command from start to a clean exit."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from fixtures import make_tiny_checkpoint
from test_server_support import ServerProcess, harness_argv, serve_argv, sse_events

PROMPT = "the quick brown fox"
STARTUP_DELAY = 2.0
SHUTDOWN_TIMEOUT = 0.8
# Every step takes at least this long, so the drain window below holds at most ~80 steps on any machine.
STEP_DELAY = 0.01


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    model = make_tiny_checkpoint(root / "sdar", "sdar")
    argv = harness_argv(model, STARTUP_DELAY, "--policy", "fixed:4", "--num-pages", "128", "--max-running", "2",
                        "--max-waiting", "8", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT), "--log-level", "info",
                        step_delay=STEP_DELAY)
    with ServerProcess(argv, root / "server.log") as proc:
        yield proc
    assert "Traceback" not in proc.log(), proc.log()


def _body(max_tokens: int, **extra) -> dict:
    return {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, **extra}


def test_health_is_503_until_the_model_loaded(server):
    server.wait_listening()
    r = httpx.get(server.url + "/health")
    assert (r.status_code, r.json()) == (503, {"status": "loading"})
    r = httpx.post(server.url + "/v1/completions", json=_body(2))
    assert (r.status_code, r.json()["error"]["code"]) == (503, "model_loading") and "Retry-After" in r.headers
    assert httpx.get(server.url + "/metrics").status_code == 200
    server.wait_healthy()
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_overload_burst_gets_503_and_accepted_requests_complete(server):
    server.wait_healthy()
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def send() -> None:
        r = httpx.post(server.url + "/v1/completions", json=_body(24, policy="ar"), timeout=120)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=send) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    statuses = sorted(r.status_code for r in results)
    assert len(results) == 24 and set(statuses) <= {200, 503}, statuses
    refused = [r for r in results if r.status_code == 503]
    accepted = [r for r in results if r.status_code == 200]
    assert refused and accepted, statuses
    for r in refused:
        assert r.json()["error"]["code"] == "queue_full" and int(r.headers["Retry-After"]) >= 1
    for r in accepted:
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 24


def _stream(url: str, body: dict, out: dict, key: str, started: threading.Event | None = None) -> None:
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        out[key + ".status"] = r.status_code
        lines = []
        for line in r.iter_lines():
            lines.append(line)
            if started is not None and line.startswith("data: {"):
                started.set()
    out[key] = sse_events(lines)


def test_sigterm_drains_then_aborts_and_exits_cleanly(server):
    server.wait_healthy()
    out: dict = {}
    started = threading.Event()
    # 'short' needs 10 steps: it finishes inside the drain window. The seven long ones need ~230
    # steps each through 2 running slots (~800 steps, over 8 s at STEP_DELAY): the window cannot hold them.
    threads = [threading.Thread(target=_stream, args=(server.url, _body(10, policy="ar"), out, "short", started))]
    threads += [threading.Thread(target=_stream, args=(server.url, _body(230, policy="ar"), out, f"long{i}"))
                for i in range(7)]
    for t in threads:
        t.start()
    assert started.wait(30)
    time.sleep(0.2)  # let the long ones reach the engine
    t_signal = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    refused = httpx.post(server.url + "/v1/completions", json=_body(2), timeout=10)
    assert (refused.status_code, refused.json()["error"]["code"]) == (503, "shutting_down")
    assert httpx.get(server.url + "/health").json() == {"status": "draining"}
    for t in threads:
        t.join(60)
    assert server.proc.wait(30) == 0, server.log()
    assert time.monotonic() - t_signal < SHUTDOWN_TIMEOUT + 10

    def finish(key: str) -> str:
        events = out[key]
        assert out[key + ".status"] == 200 and events[-1] == "[DONE]", events
        return [e for e in events if isinstance(e, dict)][-1]["choices"][0]["finish_reason"]

    assert finish("short") == "length"
    reasons = [finish(f"long{i}") for i in range(7)]
    assert set(reasons) <= {"length", "abort"} and "abort" in reasons, reasons
    print("long requests finished with", reasons)
    assert "draining" in server.log()



def test_optimus_serve_command_answers_and_exits_cleanly(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "sdar", "sdar")
    with ServerProcess(serve_argv(model, "--policy", "fixed:4", "--num-pages", "64"), tmp_path / "serve.log") as server:
        server.wait_healthy()
        r = httpx.post(server.url + "/v1/completions", json=_body(6), timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6, r.text
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0, server.log()
    assert "Traceback" not in server.log(), server.log()
