"""Server-sent events: ``data: {json}\\n\\n`` frames ending with ``data: [DONE]\\n\\n``.

A choice's text is released as soon as its committed contiguous prefix grows, minus a tail that
could still change: a trailing U+FFFD (a UTF-8 sequence split across tokens, which the next token
may complete) and, before that, the longest tail that could still grow into a stop string. The
engine withholds stop prefixes too, but it cannot see one hidden behind a trailing U+FFFD."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from optimus.server.errors import APIError, from_engine_error
from optimus.server.generation import Generation
from optimus.server.responses import ResponseMeta, chunk, usage_chunk

log = logging.getLogger("optimus.server")

DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class TextDelta:
    """Tracks the text of one choice already sent to the client."""

    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self.sent = ""
        self._stop = stop

    def advance(self, text: str, final: bool) -> str:
        """New text safe to send, given the cumulative ``text`` of the latest output."""
        if final:
            if not text.startswith(self.sent):  # the engine revised sent text: cannot unsend it
                log.warning("final text does not extend the streamed text; sending no more")
                return ""
            delta, self.sent = text[len(self.sent):], text
            return delta
        safe = text.rstrip("\ufffd")
        safe = safe[: len(safe) - stop_prefix_len(safe, self._stop)]
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta


def stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


async def event_stream(meta: ResponseMeta, generation: Generation, prompt_tokens: int,
                       include_usage: bool) -> AsyncIterator[str]:
    """The SSE body of a started generation; closing it early aborts the engine requests."""
    deltas = {c.index: TextDelta(c.params.stop) for c in generation.choices}
    completion_tokens = {c.index: 0 for c in generation.choices}
    try:
        try:
            if meta.chat:  # the role arrives first, as in OpenAI's stream
                for c in generation.choices:
                    yield sse(chunk(meta, c.index, "", None, first=True, with_usage_field=include_usage))
            async for update in generation.updates():
                out = update.output
                text = deltas[update.index].advance(out.text, out.finished)
                completion_tokens[update.index] = len(out.token_ids)
                if text or out.finished:
                    yield sse(chunk(meta, update.index, text, out.finish_reason if out.finished else None,
                                    with_usage_field=include_usage))
            if include_usage:
                yield sse(usage_chunk(meta, prompt_tokens, sum(completion_tokens.values())))
        except Exception as exc:  # after the headers went out, errors travel as a frame
            error = exc if isinstance(exc, APIError) else from_engine_error(exc)
            yield sse(error.envelope())
        yield DONE
    finally:
        generation.close()
