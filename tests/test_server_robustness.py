"""No request can break the server: a real ``optimus serve`` on the shipped default model (its
default policy) against the inputs that used to kill the engine or answer 5xx, a property test over
arbitrary JSON bodies on every route, client aborts in the metrics, the per-call work bound, and a
bounded soak of mixed good, bad, cancelled and disconnected requests."""

from __future__ import annotations

import concurrent.futures
import json
import random
import re
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_server_support import ServerProcess, serve_argv, sse_events

VOCAB = 8192  # the shipped model's vocabulary
MAX_CALL_TOKENS = 4096
SURROGATE = "\\ud800"  # as a JSON escape: legal JSON, not valid Unicode text


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    argv = serve_argv("default", "--max-running", "16", "--max-waiting", "64", "--max-n", "8",
                      "--max-call-tokens", str(MAX_CALL_TOKENS), "--log-level", "warning")
    with ServerProcess(argv, root / "server.log") as proc:
        proc.wait_healthy(timeout=180)
        yield proc
        assert "Traceback" not in proc.log().replace("simulated", ""), proc.log()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def _raw(http, path: str, raw: str) -> httpx.Response:
    return http.post(path, content=raw.encode(), headers={"content-type": "application/json"})


def _chat(content: str = "What is 2 + 3?", **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}


def _assert_serves(http) -> None:
    assert http.get("/health").json() == {"status": "ok"}
    r = http.post("/v1/chat/completions", json=_chat(ignore_eos=True))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _assert_400(r: httpx.Response, param: str | None) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    for leak in ("Traceback", "Error:", "index", "out of bounds"):
        assert leak not in error["message"], error


# ---------------------------------------------------------------- inputs that used to break it

@pytest.mark.parametrize("stop_id", [999999, VOCAB, -99999, -1, 10**30, 128009])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stop_ids_outside_the_vocabulary_are_refused_and_the_engine_serves_on(http, path, stop_id):
    body = {"max_tokens": 4, "min_tokens": 2, "stop_token_ids": [stop_id]}
    body.update({"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    _assert_400(http.post(path, json=body), "stop_token_ids")
    _assert_serves(http)


@pytest.mark.parametrize("path,raw,param", [
    ("/v1/completions", f'{{"prompt": "{SURROGATE}"}}', "prompt"),
    ("/v1/completions", f'{{"prompt": ["ok", "a{SURROGATE}"]}}', "prompt"),
    ("/v1/completions", f'{{"prompt": "ok", "stop": "{SURROGATE}"}}', "stop"),
    ("/v1/chat/completions", f'{{"messages": [{{"role": "user", "content": "{SURROGATE}"}}]}}',
     "messages.0.content"),
    ("/v1/chat/completions",
     f'{{"messages": [{{"role": "user", "content": [{{"type": "text", "text": "{SURROGATE}"}}]}}]}}',
     "messages.0.content.list[ContentPart].0.text"),
    ("/tokenize", f'{{"prompt": "{SURROGATE}"}}', "prompt"),
    ("/tokenize", f'{{"messages": [{{"role": "user", "content": "x{SURROGATE}"}}]}}', "messages.0.content"),
    ("/ui/generate", f'{{"prompt": "{SURROGATE}"}}', "prompt"),
])
def test_lone_surrogates_are_400(http, path, raw, param):
    r = _raw(http, path, raw)
    _assert_400(r, param)
    assert "surrogate" in r.json()["error"]["message"]


def test_bodies_name_the_problem(http):
    r = http.post("/v1/completions")
    _assert_400(r, None)
    assert r.json()["error"]["message"] == "request body is missing: send a JSON object"
    r = http.post("/v1/chat/completions", json={})
    _assert_400(r, "messages")
    assert "None" not in r.json()["error"]["message"]


def test_the_largest_seed_with_several_choices_is_served(http):
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "n": 2, "seed": 2**63 - 1,
                                           "temperature": 0.8})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2


def test_the_page_refuses_what_the_api_refuses(http):
    long_prompt = "word " * 5000  # over the shipped model's context
    api = http.post("/v1/completions", json={"prompt": long_prompt})
    page = http.post("/ui/generate", json={"prompt": long_prompt[:7999], "chat": False})
    assert api.status_code == page.status_code == 400, (api.text, page.text)
    assert api.json()["error"]["code"] == page.json()["error"]["code"] == "context_length_exceeded"


def test_the_work_one_call_creates_is_bounded(http):
    fan_out = {"prompt": ["x"] * 32, "n": 8, "max_tokens": 200}
    r = http.post("/v1/completions", json=fan_out)
    _assert_400(r, "max_tokens")
    assert "--max-call-tokens" in r.json()["error"]["message"]
    # An omitted max_tokens shrinks to fit the bound instead of being refused.
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "n": 8,
                                                "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert {c["finish_reason"] for c in r.json()["choices"]} == {"length"}
    assert r.json()["usage"]["completion_tokens"] <= MAX_CALL_TOKENS


def test_client_aborts_are_counted(server, http):
    before = _metric(http.get("/metrics").text, "optimus_requests_finished_total", '{finish_reason="abort"}')
    streams = 6
    body = {"prompt": "tell me", "max_tokens": 200, "ignore_eos": True, "stream": True}
    for _ in range(streams):  # read the first chunk, then hang up
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            next(r.iter_lines())
    cancelled = 4
    for _ in range(cancelled):  # give up before anything comes back
        try:
            httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=0.05)
        except httpx.TimeoutException:
            pass
    deadline = time.monotonic() + 30
    while True:
        text = http.get("/metrics").text
        after = _metric(text, "optimus_requests_finished_total", '{finish_reason="abort"}')
        idle = _metric(text, "optimus_num_requests_running") == 0
        if (after - before == streams + cancelled and idle) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert after - before == streams + cancelled


def test_a_fan_out_does_not_starve_an_ordinary_request(server, http):
    fan_out = {"prompt": ["count with me"] * 8, "n": 8, "max_tokens": 48, "ignore_eos": True}  # 64 sequences
    finished = {}

    def call(name: str, body: dict) -> None:
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        finished[name] = time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        big = pool.submit(call, "fan_out", fan_out)
        time.sleep(0.5)  # the fan-out fills every running slot and queues the rest
        small = pool.submit(call, "single", {"prompt": "hi", "max_tokens": 8, "ignore_eos": True})
        big.result(), small.result()
    assert finished["single"] < finished["fan_out"]


# ---------------------------------------------------------------- any JSON, any route

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                     st.text(max_size=6),
                     st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2))
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["prompt", "messages", "role", "content", "type", "text", "tokens", "max_tokens",
                     "stop_token_ids", "min_tokens", "n", "seed", "stop", "policy", "chat", "x"]), inner,
    max_size=4), max_leaves=10)
_near_valid = st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=8), "max_tokens": st.integers(1, 4)}, optional={
    "min_tokens": st.integers(0, 4), "n": st.integers(1, 3),
    "stop_token_ids": st.lists(st.integers(-2**64, 2**64) | st.integers(VOCAB - 2, VOCAB + 2), max_size=3),
    "stop": st.lists(st.text(min_size=1, max_size=2), max_size=2), "seed": st.integers(-2, 2**64),
    "temperature": st.floats(0, 2), "policy": st.sampled_from(["ar", "fixed:2", "elastic", "fixed:0", "x"]),
    "decoding_rule": st.sampled_from(["topk", "factor", "threshold"]), "tokens_per_step": st.integers(-1, 64),
})
ROUTES = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/ui/generate"]


def _as_route(path: str, body):
    """Near-valid completion bodies reshaped for the route, so its deeper checks are reached."""
    if not isinstance(body, dict) or "prompt" not in body:
        return body
    if path == "/v1/chat/completions":
        return {**{k: v for k, v in body.items() if k != "prompt"},
                "messages": [{"role": "user", "content": body["prompt"]}]}
    if path == "/detokenize":
        return {"tokens": body.get("stop_token_ids", [1, 2])}
    if path in ("/tokenize", "/ui/generate"):
        extra = {"max_tokens": body.get("max_tokens", 4)} if path == "/ui/generate" else {}
        return {"prompt": body["prompt"], **extra}
    return body


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(ROUTES), body=st.one_of(_json, _near_valid))
def test_any_json_body_gets_2xx_or_4xx(http, path, body):
    raw = json.dumps(_as_route(path, body), ensure_ascii=True)  # lone surrogates travel as \ud8xx escapes
    with http.stream("POST", path, content=raw.encode(), headers={"content-type": "application/json"}) as r:
        text = r.read().decode()
    assert 200 <= r.status_code < 500, (path, raw, r.status_code, text)
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        events = sse_events(text.splitlines())
        assert not any(isinstance(e, dict) and ("error" in e or e.get("type") == "error") for e in events), text


def test_the_engine_serves_after_the_property_test(http):
    _assert_serves(http)


# ---------------------------------------------------------------- soak

_BAD_BODIES = [
    ("/v1/completions", '{"prompt": "hi", "min_tokens": 2, "max_tokens": 4, "stop_token_ids": [999999]}'),
    ("/v1/completions", f'{{"prompt": "{SURROGATE}"}}'),
    ("/v1/chat/completions", '{"messages": []}'),
    ("/v1/completions", '{"prompt": "hi", "max_tokens": -3}'),
    ("/v1/completions", '{"prompt": [99999]}'),
    ("/v1/completions", "{not json"),
    ("/v1/completions", '{"prompt": "hi", "n": 8, "max_tokens": 4000}'),
    ("/tokenize", f'{{"prompt": "{SURROGATE}"}}'),
    ("/ui/generate", '{"prompt": ""}'),
]


def _soak_one(base: str, i: int) -> str:
    rng = random.Random(i)
    kind = rng.choices(["good", "stream", "bad", "cancel", "disconnect"], weights=[35, 25, 20, 10, 10])[0]
    with httpx.Client(base_url=base, timeout=120) as c:
        if kind == "bad":
            path, raw = rng.choice(_BAD_BODIES)
            r = _raw(c, path, raw)
            assert 400 <= r.status_code < 500, (raw, r.status_code, r.text)
            return kind
        max_tokens = rng.randint(2, 24)
        chat = rng.random() < 0.5
        body = _chat(f"soak {i}", max_tokens=max_tokens, ignore_eos=True) if chat else \
            {"prompt": f"soak {i}", "max_tokens": max_tokens, "ignore_eos": True}
        body["n"] = rng.choice([1, 1, 2])
        path = "/v1/chat/completions" if chat else "/v1/completions"
        if kind == "good":
            r = c.post(path, json=body)
            assert r.status_code == 200, r.text
            out = r.json()
            assert [ch["finish_reason"] for ch in out["choices"]] == ["length"] * body["n"]
            assert out["usage"]["completion_tokens"] == max_tokens * body["n"], out
        elif kind == "stream":
            body.update(stream=True, stream_options={"include_usage": True})
            with c.stream("POST", path, json=body) as r:
                assert r.status_code == 200
                events = sse_events(r.iter_lines())
            usage = [e for e in events if isinstance(e, dict) and e.get("usage")]
            assert events[-1] == "[DONE]" and usage[-1]["usage"]["completion_tokens"] == max_tokens * body["n"]
        elif kind == "cancel":
            try:
                httpx.post(base + path, json={**body, "max_tokens": 200}, timeout=rng.uniform(0.01, 0.3))
            except httpx.TimeoutException:
                pass
        else:  # a stream the client drops after the first frame
            with c.stream("POST", path, json={**body, "max_tokens": 200, "stream": True}) as r:
                assert r.status_code == 200
                next(r.iter_lines())
    return kind


def test_soak_mixed_traffic(server, http):
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        kinds = list(pool.map(lambda i: _soak_one(server.url, i), range(300)))
    assert len(kinds) == 300 and {"good", "stream", "bad", "cancel", "disconnect"} <= set(kinds)
    deadline = time.monotonic() + 30
    while True:  # aborted requests free their pages once the engine has seen the aborts
        text = http.get("/metrics").text
        leaked = (_metric(text, "optimus_num_requests_running"), _metric(text, "optimus_kv_cache_usage_ratio"))
        if leaked == (0.0, 0.0) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert leaked == (0.0, 0.0)
    _assert_serves(http)
