"""One streamed request against an OpenAI-compatible server, timed on the client.

TTFT is the time to the first frame carrying text; each later text frame adds one inter-token
gap (ITL) — a frame may hold several tokens (a dLLM step commits several), as in
``vllm bench serve``. The output token count comes from the server's ``usage`` frame when it
sends one (``stream_options.include_usage``), else from the benchmark tokenizer."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx

from optimus.bench.datasets import SampleRequest

CHAT_ENDPOINT = "/v1/chat/completions"


@dataclass(frozen=True)
class RequestOptions:
    model: str
    endpoint: str = "/v1/completions"
    ignore_eos: bool = False
    temperature: float = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)  # e.g. {"policy": "fixed:8"}

    @property
    def chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith(CHAT_ENDPOINT)


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)  # seconds between text frames after the first
    latency: float = 0.0  # seconds, send to last frame
    start_time: float = 0.0  # perf_counter at send
    generated_text: str = ""
    error: str = ""


def request_body(req: SampleRequest, opts: RequestOptions) -> dict[str, Any]:
    body: dict[str, Any] = {"model": opts.model, "max_tokens": req.expected_output_len,
                            "temperature": opts.temperature, "stream": True,
                            "stream_options": {"include_usage": True}}
    if opts.chat:
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if opts.ignore_eos:
        body["ignore_eos"] = True
    body.update(opts.extra_body)
    return body


async def send_request(client: httpx.AsyncClient, req: SampleRequest, opts: RequestOptions,
                       count_tokens: Callable[[str], int]) -> RequestResult:
    result = RequestResult(prompt_len=req.prompt_len, start_time=time.perf_counter())
    last = result.start_time
    usage: dict | None = None
    try:
        async with client.stream("POST", opts.endpoint, json=request_body(req, opts)) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}"
                return result
            async for frame in _frames(response):
                if "error" in frame:
                    result.error = json.dumps(frame["error"])[:300]
                    return result
                usage = frame.get("usage") or usage
                text = _frame_text(frame, opts.chat)
                if not text:
                    continue
                now = time.perf_counter()
                if not result.generated_text:
                    result.ttft = now - result.start_time
                else:
                    result.itl.append(now - last)
                last = now
                result.generated_text += text
        result.latency = time.perf_counter() - result.start_time
        result.success = True
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    if usage:
        result.output_tokens = int(usage.get("completion_tokens") or 0)
        result.prompt_len = int(usage.get("prompt_tokens") or result.prompt_len)
    else:
        result.output_tokens = count_tokens(result.generated_text)
    return result


async def _frames(response: httpx.Response):
    """JSON payloads of ``data:`` lines, up to ``[DONE]``."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _frame_text(frame: dict, chat: bool) -> str:
    choices = frame.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""
