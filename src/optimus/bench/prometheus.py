"""The server's dLLM counters, scraped from ``/metrics`` before and after a run.

Parsing is generic over the Prometheus text format: every sample whose name starts with
``optimus_`` is kept as ``name{labels}`` -> value; the run's counters are the differences of
the ``_total`` samples. The derived figures (steps, positions computed, tokens committed,
tokens per engine step, tau = tokens per request-step, token efficiency, chunk-size shares) read the series ``optimus serve`` exports
and are left out when a server does not export them (vLLM, SGLang)."""

from __future__ import annotations

import re

import httpx

PREFIX = "optimus_"
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_CHUNK = re.compile(r'^optimus_chunk_size_choices_total\{.*chunk_size="(\d+)".*\}$')


def parse_prometheus(text: str, prefix: str = PREFIX) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        try:
            out[name + labels] = float(value)
        except ValueError:
            continue
    return out


async def scrape(client: httpx.AsyncClient, path: str = "/metrics") -> dict[str, float]:
    """Samples of the server's ``/metrics``; empty when it has none or cannot be reached."""
    try:
        response = await client.get(path, timeout=10.0)
    except httpx.HTTPError:
        return {}
    return parse_prometheus(response.text) if response.status_code == 200 else {}


async def scrape_settled(client: httpx.AsyncClient, path: str = "/metrics", interval_s: float = 0.15,
                         limit_s: float = 3.0) -> dict[str, float]:
    """A scrape whose counters have stopped moving (two reads ``interval_s`` apart agree):
    a server whose engine runs in another process publishes its counters a moment after the
    last answer leaves, so a scrape right after the run could miss the last steps."""
    import asyncio
    import time

    deadline = time.monotonic() + limit_s
    last = await scrape(client, path)
    while time.monotonic() < deadline:
        await asyncio.sleep(interval_s)
        now = await scrape(client, path)
        if dllm_summary(counter_deltas(last, now)) == dllm_summary(counter_deltas(now, now)):
            return now  # the engine's counters (steps, positions, commits) stood still
        last = now
    return last


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()
            if k.split("{")[0].endswith("_total")}


def dllm_summary(deltas: dict[str, float]) -> dict:
    steps = deltas.get("optimus_engine_steps_total")
    computed = deltas.get("optimus_positions_computed_total")
    committed = deltas.get("optimus_tokens_committed_total")
    chunks = {int(m.group(1)): v for k, v in deltas.items() if (m := _CHUNK.match(k)) and v > 0}
    out: dict = {}
    if steps is not None:
        out["steps"] = steps
        wall = deltas.get("optimus_engine_step_seconds_total")
        device = deltas.get("optimus_engine_device_seconds_total")
        in_flight = deltas.get("optimus_engine_steps_in_flight_total")
        if steps and in_flight is not None:
            out["steps_in_flight_share"] = in_flight / steps  # the rest: the next plan waited for them
        if steps and wall:
            out["mean_step_ms"] = 1e3 * wall / steps
        if wall and device is not None:
            out["device_over_step_time"] = device / wall
    if computed is not None:
        out["positions_computed"] = computed
    if committed is not None:
        out["tokens_committed"] = committed
        if steps:
            out["tokens_per_step"] = committed / steps
        if computed:
            out["token_efficiency"] = committed / computed
    if chunks:
        total = sum(chunks.values())
        out["request_steps"] = total  # one per request per step it decoded in
        out["chunk_size_share"] = {str(c): n / total for c, n in sorted(chunks.items())}
        out["mean_chunk_size"] = sum(c * n for c, n in chunks.items()) / total
        if committed is not None:
            out["tau"] = committed / total  # tokens committed per request-step
    return out
