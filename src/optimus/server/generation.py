"""One API call's engine requests, one per (prompt, choice), merged into a single stream.

Invariants: every engine request this object submits is either finished or aborted once
``close()`` returned; ``start()`` returns only when every choice was admitted and produced its
first output, so refusals (queue full, bad parameters) surface before any response byte."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from optimus.core.params import SamplingParams
from optimus.server.errors import from_engine_error
from optimus.server.metrics import ServerMetrics


@dataclass(frozen=True)
class Choice:
    index: int  # OpenAI choice index: prompt_index * n + sample
    request_id: str  # engine request id
    prompt_ids: tuple[int, ...]
    params: SamplingParams


@dataclass(frozen=True)
class Update:
    index: int
    output: object  # RequestOutput: cumulative snapshot of choice ``index``


@dataclass(frozen=True)
class _Failure:
    index: int | None
    error: BaseException


class Generation:
    def __init__(self, engine, choices: list[Choice], metrics: ServerMetrics, group: str | None = None,
                 stream_interval: int = 1) -> None:
        self._engine = engine
        self._interval = stream_interval  # an update waits until its answer grew by this many tokens
        self._choices = choices
        self._group = group  # the engine admits this call's choices fairly against other calls
        self._metrics = metrics
        self._start = time.monotonic()
        self._queue: asyncio.Queue[Update | _Failure] = asyncio.Queue()
        self._buffered: list[Update] = []
        self._finished: set[int] = set()
        self._tasks: list[asyncio.Task] = []
        self._trackers = {c.index: metrics.tracker(len(c.prompt_ids), start=self._start) for c in choices}
        self._closed = False

    @property
    def choices(self) -> list[Choice]:
        return self._choices

    async def start(self) -> None:
        """Submit all choices; raise the mapped ``APIError`` if any is refused (the rest aborted)."""
        self._tasks = [asyncio.create_task(self._pump(c)) for c in self._choices]
        heard: set[int] = set()
        while len(heard) < len(self._choices):
            item = await self._queue.get()
            if isinstance(item, _Failure):
                self.close()
                error = from_engine_error(item.error)
                self._metrics.rejected.labels(error.code or str(error.status)).inc()
                raise error
            heard.add(item.index)
            self._note(item)
            self._buffered.append(item)

    async def updates(self) -> AsyncIterator[Update]:
        """Updates in arrival order until every choice finished; raises on engine failure."""
        while self._buffered:
            yield self._buffered.pop(0)
        while len(self._finished) < len(self._choices):
            item = await self._queue.get()
            if isinstance(item, _Failure):
                raise from_engine_error(item.error)
            self._note(item)
            yield item

    async def final_outputs(self) -> list:
        """The last output of every choice, by index."""
        last: dict[int, object] = {}
        async for update in self.updates():
            last[update.index] = update.output
        return [last[c.index] for c in self._choices]

    def fail(self, error: BaseException) -> None:
        """End the stream with ``error`` (the watchdog uses this when a step hangs)."""
        self._queue.put_nowait(_Failure(None, error))

    def close(self) -> None:
        """Abort every unfinished engine request and stop listening to the engine (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for choice in self._choices:
            if choice.index not in self._finished:
                self._trackers[choice.index].abandoned()
                try:
                    self._engine.abort(choice.request_id)
                except Exception:  # an abort of an unknown or dead request is a no-op here
                    pass
        for task in self._tasks:
            task.cancel()

    def _note(self, update: Update) -> None:
        if update.output.finished:
            self._finished.add(update.index)

    async def _pump(self, choice: Choice) -> None:
        tracker = self._trackers[choice.index]
        stream = self._engine.generate(choice.request_id, list(choice.prompt_ids), choice.params,
                                       group=self._group)
        admitted = False
        sent = 0  # answer tokens in the latest update passed on
        tracker.submitted()
        try:
            async for output in stream:
                grown = len(output.token_ids) - sent
                if admitted and not output.finished and grown < self._interval:
                    continue  # outputs are cumulative: the next one passed on carries these tokens
                sent += grown
                if not admitted:
                    tracker.admitted()
                    admitted = True
                tracker.on_output(output)
                self._queue.put_nowait(Update(choice.index, output))
                if output.finished:
                    return
            self._queue.put_nowait(_Failure(choice.index, RuntimeError("engine stream ended early")))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if admitted:
                tracker.failed()
            else:
                tracker.refused()  # never ran: a refusal, not an aborted request
            self._queue.put_nowait(_Failure(choice.index, exc))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await _quietly(aclose())


async def _quietly(awaitable) -> None:
    try:
        await awaitable
    except Exception:
        pass
