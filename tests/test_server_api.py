"""The HTTP API of a real ``optimus serve`` process over a tiny random SDAR checkpoint, driven by
the official ``openai`` client and raw httpx: results, streaming, usage, stop strings, every
bad-input class, a fuzz pass, and client disconnects."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fixtures import make_tiny_checkpoint
from test_server_support import ServerProcess, harness_argv, sse_events

API_KEY = "test-secret-key"
MODEL = "tiny"
PROMPT = "the quick brown fox"
LONG = {"max_tokens": 230, "ignore_eos": True, "policy": "ar"}  # 230 steps: at least 0.7 s at STEP_DELAY
STEP_DELAY = 0.003  # every engine step takes at least this long, however fast the machine


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = make_tiny_checkpoint(root / "sdar", "sdar")
    argv = harness_argv(model, 0.0, "--policy", "fixed:4", "--num-pages", "256", "--api-key", API_KEY,
                        "--served-model-name", MODEL, "--max-n", "4", "--max-tokens-cap", "240",
                        "--max-body-bytes", "65536", "--log-level", "warning", step_delay=STEP_DELAY)
    with ServerProcess(argv, root / "server.log", api_key=API_KEY) as proc:
        proc.wait_healthy()
        yield proc
        assert "Traceback" not in proc.log(), proc.log()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as c:
        yield c


def count_tokens(http, **body) -> int:
    r = http.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    return r.json()["count"]


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def assert_envelope(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in r.text
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body


# ---------------------------------------------------------------- results

def test_models_version_health(server, http):
    models = http.get("/v1/models").json()["data"]
    assert [(m["id"], m["root"], m["max_model_len"]) for m in models] == [(MODEL, "sdar", 256)]
    assert http.get("/version").json()["version"]
    assert http.get("/health").json() == {"status": "ok"}


def test_completion_usage(client, http):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length" and isinstance(r.choices[0].text, str)
    assert r.usage.prompt_tokens == count_tokens(http, prompt=PROMPT)
    assert (r.usage.completion_tokens, r.usage.total_tokens) == (6, r.usage.prompt_tokens + 6)


def test_streaming_matches_full_response(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=12, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_sse_framing(http):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "stream": True, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    frames = raw.split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    assert all(f.startswith("data: {") for f in frames[:-2]) and len(frames) >= 3


def test_chat(client, http):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens == count_tokens(http, messages=messages)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=5,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_stream_with_several_choices(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2,
                                                 max_tokens=3, stream=True, extra_body={"ignore_eos": True}))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "length"
        assert all(c.finish_reason is None for c in mine[:-1])


def _stop_candidate(text: str) -> str | None:
    """A short printable piece whose first occurrence is not at the very start."""
    for k in range(1, len(text) - 1):
        piece = text[k:k + 2]
        if "\ufffd" not in piece and piece.strip() and text.find(piece) == k:
            return piece
    return None


@pytest.mark.parametrize("prompt", [PROMPT, "hello world! what is two plus two?"])
def test_stop_string_is_cut(client, prompt):
    kw = dict(model=MODEL, prompt=prompt, max_tokens=24, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    stop = _stop_candidate(full)
    if stop is None:
        pytest.skip(f"no usable stop piece in {full!r}")
    cut = client.completions.create(stop=[stop], **kw).choices[0]
    assert (cut.text, cut.finish_reason) == (full[: full.find(stop)], "stop")
    streamed = list(client.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == cut.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_n_batch_and_token_prompts(client, http):
    prompts = ["hello world", "the lazy dog"]
    r = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=3, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == sum(count_tokens(http, prompt=p) for p in prompts)
    assert r.usage.completion_tokens == 12
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, extra_body={"ignore_eos": True})
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == by_text.choices[0].text
    nested = client.completions.create(model=MODEL, prompt=[ids, ids[:3]], max_tokens=2)
    assert len(nested.choices) == 2


def test_tokenize_roundtrip(http):
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == PROMPT


def test_optimus_extensions_accepted(client):
    for extra in ({"policy": "ar"}, {"decoding_rule": "topk", "tokens_per_step": 2},
                  {"decoding_rule": "threshold", "threshold": 0.5}, {"policy": "fixed:2", "top_k": 5}):
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                      extra_body={"ignore_eos": True, **extra})
        assert r.choices[0].finish_reason == "length", extra


# ---------------------------------------------------------------- bad input

def _completion(**fields):
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, **fields}


def _chat(**fields):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


BAD_REQUESTS = [  # (path, body, status, code, param)
    ("/v1/completions", _completion(temperature=-1), 400, None, "temperature"),
    ("/v1/completions", _completion(top_p=0), 400, None, "top_p"),
    ("/v1/completions", _completion(n=0), 400, None, "n"),
    ("/v1/completions", _completion(max_tokens=0), 400, None, "max_tokens"),
    ("/v1/completions", _completion(max_tokens="12"), 400, None, "max_tokens"),
    ("/v1/completions", _completion(stop=[""]), 400, None, "stop"),
    ("/v1/completions", _completion(decoding_rule="nope"), 400, None, "decoding_rule"),
    ("/v1/completions", _completion(policy="fixed:0"), 400, None, None),
    ("/v1/completions", _completion(seed=-1), 400, None, "seed"),
    ("/v1/completions", _completion(min_tokens=5), 400, None, "min_tokens"),
    ("/v1/completions", _completion(stream_options={"include_usage": True}), 400, None, "stream_options"),
    ("/v1/completions", _completion(bogus_field=1), 400, None, "bogus_field"),
    ("/v1/completions", {"model": MODEL}, 400, None, "prompt"),
    ("/v1/completions", _completion(prompt=[]), 400, None, "prompt"),
    ("/v1/completions", _completion(prompt=[1, 10**6]), 400, None, "prompt"),
    ("/v1/completions", [1, 2], 400, None, None),
    ("/v1/chat/completions", _chat(messages=[]), 400, None, "messages"),
    ("/v1/chat/completions", _chat(messages=[{"role": "robot", "content": "x"}]), 400, None, None),
    # fields we cannot honour
    ("/v1/completions", _completion(logprobs=21), 400, None, "logprobs"),
    ("/v1/completions", _completion(logprobs=-1), 400, None, "logprobs"),
    ("/v1/completions", _completion(echo=True, stream=True), 400, "unsupported_parameter", "echo"),
    ("/v1/chat/completions", _chat(echo=True), 400, "unsupported_parameter", "echo"),
    ("/v1/completions", _completion(frequency_penalty=0.5), 400, "unsupported_parameter", "frequency_penalty"),
    ("/v1/chat/completions", _chat(logprobs=True), 400, "unsupported_parameter", "logprobs"),
    ("/v1/chat/completions", _chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400,
     "unsupported_parameter", "tools"),
    ("/v1/chat/completions", _chat(response_format={"type": "json_object"}), 400, "unsupported_parameter",
     "response_format"),
    ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     400, "unsupported_parameter", "messages.0.content"),
    ("/v1/chat/completions", _chat(messages=[{"role": "tool", "content": "x"}]), 400, "unsupported_parameter", None),
    # limits
    ("/v1/completions", _completion(prompt=[5] * 300), 400, "context_length_exceeded", "prompt"),
    ("/v1/completions", _completion(max_tokens=250), 400, None, "max_tokens"),
    ("/v1/completions", _completion(max_tokens=240, prompt=[5] * 50), 400, "context_length_exceeded", "max_tokens"),
    ("/v1/completions", _completion(n=5), 400, None, "n"),
    ("/v1/completions", _completion(model="gpt-4"), 404, "model_not_found", "model"),
    ("/v1/chat/completions", _chat(model="gpt-4"), 404, "model_not_found", "model"),
]


@pytest.mark.parametrize("path,body,status,code,param", BAD_REQUESTS)
def test_bad_request(http, path, body, status, code, param):
    assert_envelope(http.post(path, json=body), status, code, param)


def test_malformed_bodies(http):
    for raw in (b'{"prompt": "x"', b"not json", b""):
        assert_envelope(http.post("/v1/completions", content=raw, headers={"content-type": "application/json"}), 400)


def test_body_too_large(http):
    big = {"model": MODEL, "prompt": "x" * 70_000, "max_tokens": 1}
    assert_envelope(http.post("/v1/completions", json=big), 413)

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"y" * 4096
        yield b'"}'

    assert_envelope(http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"}), 413)


def test_auth(server):
    body = _completion()
    assert_envelope(httpx.post(server.url + "/v1/completions", json=body), 401, "invalid_api_key")
    for header in ("Bearer wrong-key", "Basic " + API_KEY, API_KEY):
        assert_envelope(httpx.post(server.url + "/v1/completions", json=body,
                                   headers={"Authorization": header}), 401, "invalid_api_key")
    assert_envelope(httpx.get(server.url + "/v1/models"), 401)
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert httpx.get(server.url + "/").headers["content-type"].startswith("text/html")
    assert_envelope(httpx.post(server.url + "/ui/generate", json={"prompt": "hi", "max_tokens": 2}), 401)
    with httpx.stream("POST", server.url + "/ui/generate", json={"prompt": "hi", "max_tokens": 2},
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200 and "data: " in r.read().decode()


def test_routing_errors(http):
    assert_envelope(http.get("/no/such/route"), 404)
    assert_envelope(http.put("/v1/completions", json={}), 405)


# ---------------------------------------------------------------- disconnects

def _stream_then_hang_up(url: str, body: dict, got_first: threading.Event) -> None:
    with httpx.stream("POST", url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                got_first.set()
                return  # leaving the block closes the connection mid-stream


def _post_then_time_out(url: str, body: dict) -> None:
    try:
        httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=0.3)
    except httpx.TimeoutException:
        return
    raise AssertionError("a long request finished within 0.3 s: the disconnect test proves nothing")


def test_disconnected_clients_are_aborted(server, http):
    before = http.get("/metrics").text
    events = [threading.Event() for _ in range(6)]
    threads = [threading.Thread(target=_stream_then_hang_up,
                                args=(server.url, _completion(stream=True, **LONG), e)) for e in events]
    threads += [threading.Thread(target=_post_then_time_out, args=(server.url, _completion(**LONG)))
                for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(e.is_set() for e in events)

    t0 = time.monotonic()
    fresh = http.post("/v1/completions", json=_completion(max_tokens=4, ignore_eos=True))
    assert fresh.status_code == 200 and fresh.json()["choices"][0]["finish_reason"] == "length"
    assert time.monotonic() - t0 < 10

    aborted = lambda text: metric(text, "optimus_requests_finished_total", '{finish_reason="abort"}')  # noqa: E731
    deadline = time.monotonic() + 5
    while True:
        after = http.get("/metrics").text
        idle = all(metric(after, m) == 0 for m in ("optimus_num_requests_running", "optimus_num_requests_waiting",
                                                  "optimus_kv_cache_usage_ratio"))
        if (idle and aborted(after) - aborted(before) == 8) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert aborted(after) - aborted(before) == 8
    steps = metric(after, "optimus_engine_steps_total")
    time.sleep(0.5)
    assert metric(http.get("/metrics").text, "optimus_engine_steps_total") == steps, "engine still decoding"
    for name in ("optimus_num_requests_running", "optimus_num_requests_waiting", "optimus_kv_cache_usage_ratio"):
        assert metric(after, name) == 0, f"{name} leaked:\n" + "\n".join(
            line for line in after.splitlines() if line.startswith(name))


# ---------------------------------------------------------------- fuzz (last: a crash it finds
# kills the engine, which would fail every later test too)

_junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),  # NaN/Infinity too
                  st.text(max_size=8), st.lists(st.integers(-3, 500), max_size=4),
                  st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
_valid_fields = {  # in range for the server; whatever they do to decoding must not break it
    "model": st.just(MODEL), "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1),
    "top_k": st.integers(-1, 1000), "n": st.integers(1, 3), "seed": st.integers(0, 2**62),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=2)),
    "stream": st.booleans(), "min_tokens": st.integers(0, 1), "ignore_eos": st.booleans(),
    "stop_token_ids": st.lists(st.integers(0, 383), max_size=3), "skip_special_tokens": st.booleans(),
    "decoding_rule": st.sampled_from(["threshold", "topk", "factor"]), "threshold": st.floats(0.01, 1),
    "factor": st.floats(0.1, 3), "tokens_per_step": st.integers(1, 40),
    "policy": st.sampled_from(["ar", "elastic", "fixed:3", "fixed:100"]),
    "stream_options": st.just({"include_usage": True}), "user": st.text(max_size=5),
}
_other_keys = ["logprobs", "response_format", "tools", "echo", "suffix", "best_of", "frequency_penalty",
               "max_completion_tokens", "bogus"]
_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                            "content": st.one_of(st.text(max_size=12), _junk)}), max_size=3)


@st.composite
def fuzz_request(draw):
    """A mostly valid body (max_tokens <= 4, so valid ones decode fast) with 0-2 fields replaced
    by junk of any JSON type."""
    chat = draw(st.booleans())
    body = draw(st.fixed_dictionaries({"max_tokens": st.integers(1, 4)}, optional=_valid_fields))
    if body.get("stream_options") and not body.get("stream"):
        body["stream"] = True
    if chat:
        body["messages"] = draw(st.one_of(_messages.filter(bool), st.just([{"role": "user", "content": "hi"}])))
    else:
        body["prompt"] = draw(st.one_of(st.text(min_size=1, max_size=20), st.lists(st.integers(0, 383), min_size=1,
                                                                                   max_size=6),
                                        st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=2)))
    keys = list(_valid_fields) + _other_keys + ["prompt", "messages", "max_tokens"]
    for key in draw(st.lists(st.sampled_from(keys), max_size=2, unique=True)):
        body[key] = draw(_junk)
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=fuzz_request())
def test_fuzz_never_500(http, request):
    path, body = request
    raw_body = json.dumps(body).encode()  # Python's json writes NaN and Infinity; clients may too
    with http.stream("POST", path, content=raw_body, headers={"content-type": "application/json"}) as r:
        raw = r.read().decode()
    event(f"status {r.status_code}")
    assert r.status_code in (200, 400, 404), (body, r.status_code, raw)
    if r.status_code != 200:
        assert_envelope(r, r.status_code)
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = sse_events(raw.splitlines())
        assert events[-1] == "[DONE]", raw
        assert not any(isinstance(e, dict) and "error" in e for e in events), raw
