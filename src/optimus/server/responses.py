"""OpenAI response objects: full completions, streaming chunks and usage."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ResponseMeta:
    """What every object of one API call repeats."""

    model: str
    chat: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            prefix = "chatcmpl" if self.chat else "cmpl"
            object.__setattr__(self, "id", f"{prefix}-{uuid.uuid4().hex}")

    def head(self, streaming: bool) -> dict:
        kind = ("chat.completion.chunk" if streaming else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(meta: ResponseMeta, outputs: list, prompt_tokens: int) -> dict:
    """Non-streaming response; ``outputs[i]`` is the final RequestOutput of choice i."""
    choices = []
    for index, out in enumerate(outputs):
        if meta.chat:
            choice = {"index": index, "message": {"role": "assistant", "content": out.text},
                      "logprobs": None, "finish_reason": out.finish_reason}
        else:
            choice = {"index": index, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}
        choices.append(choice)
    completion_tokens = sum(len(out.token_ids) for out in outputs)
    return {**meta.head(streaming=False), "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chunk(meta: ResponseMeta, index: int, text: str, finish_reason: str | None, *,
          first: bool = False, with_usage_field: bool = False) -> dict:
    """One SSE chunk of choice ``index``; chat's first chunk of a choice carries the role."""
    if meta.chat:
        delta: dict = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    body = {**meta.head(streaming=True), "choices": [choice]}
    if with_usage_field:
        body["usage"] = None
    return body


def usage_chunk(meta: ResponseMeta, prompt_tokens: int, completion_tokens: int) -> dict:
    return {**meta.head(streaming=True), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
