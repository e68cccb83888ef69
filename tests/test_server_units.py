"""Server pieces in-process: text deltas, prompt limits, request -> SamplingParams, error mapping,
and (over a FakeEngine) what a real engine cannot be made to do on demand: a hung step (the
watchdog), an engine failure mid-stream, a slow model load."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from optimus.config import ServerConfig
from optimus.engine.async_engine import EngineDeadError, QueueFullError, RequestFailedError
from optimus.server.app import build_app
from optimus.server.errors import APIError, from_engine_error
from optimus.server.prompts import PromptLimits, resolve_max_tokens
from optimus.server.protocol import ChatCompletionRequest, CompletionRequest
from optimus.server.streaming import TextDelta, stop_prefix_len
from test_server_support import FakeEngine, sse_events


def test_text_delta_holds_back_split_utf8_and_stop_prefixes():
    d = TextDelta(stop=("END",))
    assert d.advance("ab\ufffd", final=False) == "ab"
    assert d.advance("abc", final=False) == "c"
    assert d.advance("abcE", final=False) == ""  # could grow into "END"
    assert d.advance("abcEx\ufffd", final=False) == "Ex"
    assert d.advance("abcExEN", final=False) == ""
    assert d.advance("abcEx", final=True) == ""  # the engine cut at the stop string
    assert d.sent == "abcEx"
    assert stop_prefix_len("xxEN", ("END", "ENDING")) == 2
    assert stop_prefix_len("xxE", ()) == 0


def test_text_delta_never_unsends():
    d = TextDelta()
    assert d.advance("hello", final=False) == "hello"
    assert d.advance("help", final=False) == ""  # a revision of sent text is not streamed
    assert d.advance("hello world", final=True) == " world"


def test_resolve_max_tokens():
    limits = PromptLimits(vocab_size=100, max_model_len=64, max_tokens_cap=32)
    assert resolve_max_tokens(None, 10, limits, default=16) == 16
    assert resolve_max_tokens(None, 10, limits, default=None) == 32  # capped
    assert resolve_max_tokens(None, 50, limits, default=None) == 14  # what the context allows
    assert resolve_max_tokens(14, 50, limits, default=None) == 14
    with pytest.raises(APIError, match="context length") as err:
        resolve_max_tokens(15, 50, limits, default=None)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(APIError, match="cap"):
        resolve_max_tokens(33, 1, limits, default=None)


def test_request_to_sampling_params():
    req = CompletionRequest(prompt="x", seed=7, top_k=-1, decoding_rule="topk", tokens_per_step=3,
                            stop="##", policy="fixed:2", temperature=0.5)
    p0, p1 = req.sampling_params(10, choice=0), req.sampling_params(10, choice=1)
    assert (p0.seed, p1.seed) == (7, 8)
    assert (p0.top_k, p0.rule, p0.tokens_per_step, p0.stop, p0.policy, p0.temperature) == (
        0, "topk", 3, ("##",), "fixed:2", 0.5)
    with pytest.raises(APIError) as err:
        CompletionRequest(prompt="x", decoding_rule="bogus").sampling_params(4, choice=0)
    assert (err.value.status, err.value.param) == (400, "decoding_rule")


def test_chat_request_refuses_what_it_cannot_honour():
    ok = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                      {"type": "text", "text": "b"}]}],
                               response_format={"type": "text"}, tool_choice="none")
    ok.reject_unsupported()
    assert ok.chat() == [{"role": "user", "content": "ab"}]
    for bad in ({"tools": [{"type": "function"}]}, {"logprobs": True}, {"top_logprobs": 2},
                {"response_format": {"type": "json_schema"}}, {"presence_penalty": 1.0}):
        req = ChatCompletionRequest(messages=[{"role": "user", "content": "a"}], **bad)
        with pytest.raises(APIError) as err:
            req.reject_unsupported()
        assert err.value.status == 400 and err.value.code == "unsupported_parameter"


def test_engine_errors_map_to_statuses():
    full = from_engine_error(QueueFullError("waiting queue is full"))
    assert (full.status, full.code, full.headers.get("Retry-After")) == (503, "queue_full", "1")
    dead = from_engine_error(EngineDeadError("loop crashed: IndexError: index 999999"))
    assert (dead.status, dead.code) == (503, "engine_dead") and "999999" not in dead.message
    failed = from_engine_error(RequestFailedError("IndexError in sampling"))
    assert (failed.status, failed.code) == (500, "internal_error") and "IndexError" not in failed.message
    bad = from_engine_error(ValueError("max_tokens: too many"))
    assert (bad.status, bad.param) == (400, "max_tokens")
    internal = from_engine_error(RuntimeError("secret detail"))
    assert internal.status == 500 and "secret" not in internal.message


def _app(engine: FakeEngine, **config) -> TestClient:
    return TestClient(build_app(engine, ServerConfig(**config)), base_url="http://127.0.0.1",
                      raise_server_exceptions=False)


def _wait(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_health_while_loading_then_ready():
    engine = FakeEngine(start_delay=0.5)
    with _app(engine) as client:
        r = client.get("/health")
        assert (r.status_code, r.json(), r.headers["Retry-After"]) == (503, {"status": "loading"}, "5")
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert (r.status_code, r.json()["error"]["code"]) == (503, "model_loading")
        _wait(lambda: client.get("/health").status_code == 200)
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "aa"


def test_failed_model_load_is_fatal():
    class Broken(FakeEngine):
        async def start(self) -> None:
            raise FileNotFoundError("no config.json in /nowhere")

    fatal = []
    app = build_app(Broken(), ServerConfig(), on_fatal=lambda: fatal.append(True))
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        _wait(lambda: fatal == [True])
        assert client.get("/health").json() == {"status": "failed"}
        r = client.post("/v1/completions", json={"prompt": "hi"})
        assert (r.status_code, r.json()["error"]["code"]) == (503, "engine_failed")


def test_watchdog_marks_engine_dead_and_fails_streams():
    engine = FakeEngine(token_delay=0.05)
    fatal = []
    app = build_app(engine, ServerConfig(watchdog_timeout=0.2), on_fatal=lambda: fatal.append(True))
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        _wait(lambda: engine.ready)
        with client.stream("POST", "/v1/completions",
                           json={"prompt": "hi", "max_tokens": 200, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            assert '"text": "a"' in first
            engine.hang = True  # a step "started" an hour ago
            events = sse_events(lines)
        assert events[-1] == "[DONE]"
        errors = [e for e in events if isinstance(e, dict) and "error" in e]
        assert [e["error"]["code"] for e in errors] == ["engine_dead"]
        assert client.get("/health").json() == {"status": "dead"}
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert (r.status_code, r.json()["error"]["code"]) == (503, "engine_dead")
        assert not engine.alive and engine.live == set()
        assert fatal == [True]  # the process exits non-zero so that a supervisor restarts it


def test_page_is_refused_while_draining_like_the_api():
    engine = FakeEngine()
    app = build_app(engine, ServerConfig())
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        _wait(lambda: engine.ready)
        app.state.optimus.lifecycle.draining = True
        api = client.post("/v1/completions", json={"prompt": "hi"})
        page = client.post("/ui/generate", json={"prompt": "hi"})
        assert api.status_code == page.status_code == 503
        assert api.json()["error"]["code"] == page.json()["error"]["code"] == "shutting_down"
        assert page.headers["Retry-After"] == api.headers["Retry-After"]


def test_engine_failure_mid_stream_and_in_full_response():
    engine = FakeEngine(fail_after=2)
    with _app(engine) as client:
        _wait(lambda: engine.ready)
        with client.stream("POST", "/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9,
                                 "stream": True}) as r:
            events = sse_events(r.iter_lines())
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert (error["type"], error["message"]) == ("server_error", "internal server error")
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2]) == "aa"
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 9})
        assert r.status_code == 500 and r.json()["error"]["message"] == "internal server error"
        assert "simulated" not in r.text and "Traceback" not in r.text


def test_metrics_registry_is_per_app():
    a, b = FakeEngine(), FakeEngine()
    with _app(a) as ca, _app(b) as cb:
        _wait(lambda: a.ready and b.ready)
        assert ca.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}).status_code == 200
        assert "optimus_generation_tokens_total 3.0" in ca.get("/metrics").text
        assert "optimus_generation_tokens_total 0.0" in cb.get("/metrics").text


def test_stream_interval_batches_tokens_per_event():
    engine = FakeEngine(token_delay=0.001)  # one token per output
    with _app(engine, stream_interval=3) as client:
        _wait(lambda: engine.ready)
        with client.stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 8, "stream": True}) as r:
            events = sse_events(r.iter_lines())
    texts = [e["choices"][0]["text"] for e in events if isinstance(e, dict)]
    # the first output goes out at once (headers wait for it), then every 3 tokens, then the finish
    assert texts == ["a", "aaa", "aaa", "a"] and events[-1] == "[DONE]", texts
