"""Soak ``optimus serve`` (engine process + front-ends) with streaming clients on this machine.

    PYTHONPATH=src python benchmarks/http_soak.py --clients 200 --seconds 60 --out /tmp/soak

Starts the server on the shipped model (CPU by default) with ``--policy ar`` (each answer is
the model's greedy continuation whatever else is in the batch), asks each prompt once without
streaming for its reference answer, then runs ``--clients`` closed-loop streaming clients for
``--seconds``: each sends a request, reads its stream to ``[DONE]``, checks it, sends the next.
A stream passes when it is HTTP 200, has no error frame, ends with ``[DONE]``, its
finish_reason is ``length``, its usage counts ``--max-tokens`` tokens and its text equals the
reference. The RSS of every server process (supervisor, engine, front-ends) is read from
/proc at the start of the load, a quarter into it (warm: every client served, the batch at its
size) and at its end. Writes ``soak.json``; exit 1 on any failure."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The weather today",
           "In 1969, the first", "Water boils at", "My favourite book is", "The quick brown fox"]


def rss_by_process(root_pid: int, engine_pid: int | None = None) -> dict[str, int]:
    """VmRSS in KiB of ``root_pid`` and its descendants, keyed ``pid:role``."""
    out, todo = {}, [root_pid]
    while todo:
        pid = todo.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        kind = ("supervisor" if pid == root_pid else "engine" if pid == engine_pid else
                "resource_tracker" if "resource_tracker" in cmd else "frontend")
        out[f"{pid}:{kind}"] = rss
        todo += [int(c) for c in children]
    return out


async def one_stream(client: httpx.AsyncClient, prompt: str, args, reference: str) -> str | None:
    """None when the stream is complete and correct, else what was wrong."""
    body = {"prompt": prompt, "max_tokens": args.max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    text, finish, usage, done = "", None, None, False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return f"HTTP {r.status_code}"
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            frame = json.loads(data)
            if "error" in frame:
                return f"error frame {frame['error']}"
            usage = frame.get("usage") or usage
            for choice in frame.get("choices") or []:
                text += choice["text"]
                finish = choice["finish_reason"] or finish
    if not done or finish != "length" or not usage or usage["completion_tokens"] != args.max_tokens:
        return f"incomplete: done={done} finish={finish} usage={usage}"
    return None if text == reference else f"text differs: {text!r} != {reference!r}"


async def load(url: str, args, references: dict[str, str], sample_rss) -> dict:
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    stats = {"streams": 0, "failures": 0, "examples": []}
    deadline = time.monotonic() + args.seconds
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def client_loop(i: int) -> None:
            k = i
            while time.monotonic() < deadline:
                prompt = PROMPTS[k % len(PROMPTS)]
                k += 1
                try:
                    problem = await one_stream(client, prompt, args, references[prompt])
                except httpx.HTTPError as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                stats["streams"] += 1
                if problem:
                    stats["failures"] += 1
                    if len(stats["examples"]) < 5:
                        stats["examples"].append(problem)
        async def sample_warm() -> None:  # once every client has been through a few requests
            await asyncio.sleep(args.seconds / 4)
            stats["rss_kib_warm"] = sample_rss()
        await asyncio.gather(sample_warm(), *(client_loop(i) for i in range(args.clients)))
    return stats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--port", type=int, default=8791)
    p.add_argument("--server-args", default="--device cpu --num-pages 2048 --max-running 256 --max-waiting 1024")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "optimus.cli", "serve", "--policy", "ar", "--port", str(args.port),
           "--log-level", "info", *args.server_args.split()]
    url = f"http://127.0.0.1:{args.port}"
    with open(out / "server.log", "wb") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            result = soak(server, url, args)
        finally:
            server.terminate()
            result_code = server.wait(60)
    result["server_exit"] = result_code
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=1))
    return 0 if result["failures"] == 0 and result["streams"] and result_code == 0 else 1


def soak(server: subprocess.Popen, url: str, args) -> dict:
    t0 = time.monotonic()
    while not _healthy(url):
        if server.poll() is not None or time.monotonic() - t0 > 300:
            raise SystemExit(f"server did not start (exit {server.poll()})")
        time.sleep(0.2)
    startup_s = time.monotonic() - t0
    references = {}
    for prompt in PROMPTS:
        r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": args.max_tokens,
                                                      "ignore_eos": True}, timeout=60)
        references[prompt] = r.json()["choices"][0]["text"]
    engine = re.search(r"engine process (\d+) started", Path(args.out, "server.log").read_text())
    sample = lambda: rss_by_process(server.pid, int(engine.group(1)) if engine else None)  # noqa: E731
    rss_start = sample()
    t1 = time.monotonic()
    stats = asyncio.run(load(url, args, references, sample))
    elapsed = time.monotonic() - t1
    rss_end = sample()
    health = httpx.get(url + "/health", timeout=5).json()
    return {"clients": args.clients, "seconds": args.seconds, "elapsed_s": elapsed, "startup_s": startup_s,
            "max_tokens": args.max_tokens, **stats, "streams_per_s": stats["streams"] / elapsed,
            "rss_kib_start": rss_start, "rss_kib_end": rss_end, "health_after": health}


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    sys.exit(main())
