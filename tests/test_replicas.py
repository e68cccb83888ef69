"""``optimus serve --replicas 2`` end to end: a real server process, Ray Serve started by it, two
engine replicas of the shipped default model on CPU, the usual FastAPI ingress in front.

One module-scoped server (Ray start-up is slow). Capacity per replica is max-running 16 +
max-waiting 112 = 128, so the 200-request test fits and the burst test (320 sequences at once)
does not. The replica-kill test runs last: it leaves the server with a replaced replica.
``--policy fixed:8``: with elastic, each replica (and the replaced one) measures its step-latency
profile first, half a minute of a 2-core machine each time; routing does not depend on it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

import ray.serve  # noqa: F401  (the feature needs it: fail here, not with a vague server error)

from test_server_support import ServerProcess, serve_argv

CAPACITY = 16 + 112  # per replica


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    os.environ.pop("RAY_ADDRESS", None)  # a local Ray instance of the server's own
    argv = serve_argv("default", "--replicas", "2", "--policy", "fixed:8", "--max-running", "16", "--max-waiting", "112",
                      "--log-level", "info")  # info: the ingress logs each replica's pid when it comes up
    with ServerProcess(argv, root / "server.log") as proc:
        proc.wait_healthy(timeout=240)
        yield proc
        assert proc.stop(timeout=60) == 0, proc.log()


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _per_replica(text: str, name: str) -> dict[str, float]:
    return {r: float(v) for r, v in re.findall(rf'^{re.escape(name)}{{replica="(\w+)"}} (\S+)$', text, re.M)}


def _metrics(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=10).text


def _wait_metrics(url: str, ready, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = _metrics(url)
        if ready(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


async def _stream(client: httpx.AsyncClient, body: dict, first: asyncio.Event | None = None) -> dict:
    """One streaming completion: its frames, whether it saw content, [DONE], an error code."""
    result = {"text": "", "finish": None, "done": False, "error": None, "content_before_error": False,
              "status": None, "usage": None}
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        result["status"] = r.status_code
        if r.status_code != 200:
            await r.aread()
            result["error"] = r.json()["error"]["code"]
            return result
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                result["done"] = True
            elif line.startswith("data: "):
                frame = json.loads(line[6:])
                if "error" in frame:
                    result["error"] = frame["error"]["code"]
                    result["content_before_error"] = bool(result["text"])
                    continue
                if frame.get("usage"):
                    result["usage"] = frame["usage"]
                for choice in frame["choices"]:
                    result["text"] += choice["text"]
                    result["finish"] = choice["finish_reason"] or result["finish"]
                    if choice["text"] and first is not None:
                        first.set()
    return result


def _prompt(i: int) -> str:
    return f"Request {i}: tell me about the number {i}."


def test_200_concurrent_requests_are_all_answered_by_both_replicas(server):
    before = _metrics(server.url)

    async def one(client, i: int):
        body = {"prompt": _prompt(i), "max_tokens": 4 + i % 5, "ignore_eos": True}
        if i % 2:
            return i, await _stream(client, {**body, "stream_options": {"include_usage": True}})
        r = await client.post("/v1/completions", json=body)
        return i, r

    async def run():
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with httpx.AsyncClient(base_url=server.url, timeout=180, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    results = asyncio.run(run())
    for i, res in results:
        want = 4 + i % 5
        if i % 2:
            assert res["status"] == 200 and res["error"] is None and res["done"], (i, res)
            assert res["finish"] == "length" and res["usage"]["completion_tokens"] == want, (i, res)
        else:
            assert res.status_code == 200, (i, res.text)
            body = res.json()
            assert body["choices"][0]["finish_reason"] == "length", body
            assert body["usage"]["completion_tokens"] == want, body
    after = _metrics(server.url)
    routed = {r: v - _per_replica(before, "optimus_replica_requests_routed_total").get(r, 0)
              for r, v in _per_replica(after, "optimus_replica_requests_routed_total").items()}
    assert set(routed) == {"0", "1"} and sum(routed.values()) == 200, routed
    assert min(routed.values()) >= 50, f"least-outstanding routing left a replica nearly idle: {routed}"
    steps = _per_replica(after, "optimus_replica_engine_steps_total")
    assert all(steps[r] > 0 for r in ("0", "1")), steps
    assert _metric(after, "optimus_replica_retries_total") == 0


def test_the_openai_client_streams_a_chat_completion(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}],
                                            max_tokens=12, stream=True, extra_body={"ignore_eos": True},
                                            stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text and finish == "length" and usage.completion_tokens == 12


def test_a_client_disconnect_aborts_the_request_on_its_replica(server):
    aborts = _metric(_metrics(server.url), "optimus_requests_finished_total", '{finish_reason="abort"}')
    body = {"prompt": "Count slowly.", "max_tokens": 448, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()  # held: a dropped iterator may close the connection early
        next(line for line in lines if line.startswith("data: {"))
        busy = _wait_metrics(server.url, lambda t: max(_per_replica(
            t, "optimus_replica_kv_cache_usage_ratio").values()) > 0, timeout=10)
    assert max(_per_replica(busy, "optimus_replica_kv_cache_usage_ratio").values()) > 0, busy
    freed = _wait_metrics(server.url, lambda t: max(_per_replica(t, "optimus_replica_kv_cache_usage_ratio").values()) == 0
                          and _metric(t, "optimus_num_requests_running") == 0, timeout=20)
    assert _per_replica(freed, "optimus_replica_kv_cache_usage_ratio") == {"0": 0.0, "1": 0.0}, freed
    assert _metric(freed, "optimus_kv_cache_usage_ratio") == 0
    assert _metric(freed, "optimus_requests_finished_total", '{finish_reason="abort"}') == aborts + 1


def test_a_burst_over_capacity_gets_503_with_retry_after_never_500(server):
    # 10 calls of 8 prompts x n=4 = 320 engine requests at once, over the 2 x 128 the replicas hold
    body = {"prompt": [_prompt(i) for i in range(8)], "n": 4, "max_tokens": 4, "ignore_eos": True}

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=180) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(10)))

    responses = asyncio.run(run())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, [(r.status_code, r.text) for r in responses]
    refused = [r for r in responses if r.status_code == 503]
    assert refused and len(refused) < len(responses), codes
    for r in refused:
        assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full", r.text
    for r in responses:
        if r.status_code == 200:
            assert [c["finish_reason"] for c in r.json()["choices"]] == ["length"] * 32
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4, "ignore_eos": True},
                    timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def _replica_pid(server, replica: str) -> int:
    """The process of replica ``replica`` of *this* server, as its ingress logged it when the
    replica came up (a process-title search could find another server's replica), checked
    against the actor's title (ray::ServeReplica:optimus-replica-<i>:engine)."""
    pids = re.findall(rf"replica {replica} up \(pid (\d+)\)", server.log())
    assert pids, server.log()
    pid = int(pids[-1])
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    assert f"ServeReplica:optimus-replica-{replica}:engine" in cmdline, cmdline
    return pid


def test_a_killed_replica_fails_only_its_streamed_requests_and_comes_back(server):
    before = _metrics(server.url)
    victim = _replica_pid(server, "0")
    # 48 long streams: each replica runs 16 and queues 8, so the victim holds both kinds
    body = {"max_tokens": 96, "ignore_eos": True}

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=300,
                                     limits=httpx.Limits(max_connections=128)) as client:
            seen = [asyncio.Event() for _ in range(48)]
            tasks = [asyncio.create_task(_stream(client, {**body, "prompt": _prompt(i)}, seen[i])) for i in range(48)]
            # 17 streams with text: more than one replica runs at once (16), so the victim has
            # streamed too (with fewer, all could be the survivor's, and the victim's untouched
            # requests would be retried rather than fail)
            await asyncio.wait_for(_until(lambda: sum(e.is_set() for e in seen) >= 17), timeout=120)
            text = await asyncio.to_thread(_wait_metrics, server.url, lambda t: _per_replica(
                t, "optimus_replica_num_requests_waiting").get("0", 0) > 0, 30)
            os.kill(victim, signal.SIGKILL)
            # once the ingress has seen the loss, new requests go to the survivor
            await asyncio.to_thread(_wait_metrics, server.url, lambda t: _per_replica(
                t, "optimus_replica_up").get("0") == 0, 30)
            fresh = await asyncio.gather(*(client.post("/v1/completions", json={
                "prompt": "after", "max_tokens": 4, "ignore_eos": True}) for _ in range(4)))
            return text, await asyncio.gather(*tasks), fresh

    at_kill, streams, fresh = asyncio.run(run())
    assert _per_replica(at_kill, "optimus_replica_num_requests_waiting")["0"] > 0, at_kill
    failed = [s for s in streams if s["error"] is not None]
    for s in streams:
        assert s["status"] == 200 and s["done"], s
        if s["error"] is None:
            assert s["finish"] == "length", s
        else:  # a request the victim had already answered in part: a clean error frame
            assert s["error"] == "engine_dead" and s["content_before_error"], s
    assert failed, "the victim's running streams should have ended with engine_dead"
    assert len(failed) <= 16, failed
    after = _metrics(server.url)
    retries = _metric(after, "optimus_replica_retries_total") - _metric(before, "optimus_replica_retries_total")
    assert retries >= 1, "the victim's queued requests (nothing streamed) should have been retried"
    assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4 for r in fresh), \
        [r.text for r in fresh]
    back = _wait_metrics(server.url, lambda t: _per_replica(t, "optimus_replica_up") == {"0": 1.0, "1": 1.0}, 180)
    assert _per_replica(back, "optimus_replica_up") == {"0": 1.0, "1": 1.0}, back
    assert _per_replica(back, "optimus_replica_lost_total")["0"] >= 1
    assert _replica_pid(server, "0") != victim
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "again", "max_tokens": 4, "ignore_eos": True},
                   timeout=60)
    assert r.status_code == 200


async def _until(predicate, period: float = 0.02) -> None:
    while not predicate():
        await asyncio.sleep(period)
