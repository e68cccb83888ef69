"""One request as a front-end sees it: the tokens the engine process sent so far, their text
(detokenized here, incrementally), and a waiter its consumer sleeps on.

Invariant: ``tokens`` is the answer's contiguous committed prefix as of the latest STEP message;
``next()`` returns ONE cumulative ``RequestOutput`` however many messages arrived since the
consumer last asked (commit events are concatenated), so a slow consumer costs no extra work."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from optimus.core.errors import QueueFullError, RequestFailedError
from optimus.core.outputs import CommitEvent, RequestOutput, RequestStats, TokenIds, extended
from optimus.core.params import SamplingParams
from optimus.engine import wire
from optimus.engine.stop_strings import first_stop, hold_back_stop_prefix
from optimus.models.detokenizer import IncrementalDetokenizer


@dataclass
class RemoteStream:
    handle: int  # the front-end's id of this request on the wire
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    group: str | None
    events_wanted: bool
    detokenizer: IncrementalDetokenizer
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stats: RequestStats = field(default_factory=RequestStats)
    events: list[CommitEvent] = field(default_factory=list)  # not yet handed to the consumer
    error: BaseException | None = None
    fresh: bool = False  # news the consumer has not read
    delivered: bool = False  # the consumer has seen an output (a restarted engine cannot resume it)
    submitted_epoch: int | None = None
    _waiter: asyncio.Future | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def apply(self, base: int, new: list[int], finish: str | None, extra: dict | None) -> None:
        """One STEP item from the engine."""
        self.tokens = extended(self.tokens, base, new)  # a resend (base short of the end): a new list
        if extra:
            if wire.EVENTS in extra:
                self.events.extend(wire.events_from_wire(extra[wire.EVENTS]))
            if wire.STATS in extra:
                wire.stats_into(self.stats, extra[wire.STATS])
            if wire.REFUSED in extra:
                kind, message = extra[wire.REFUSED]
                self.fail(QueueFullError(message) if kind == "queue_full" else
                          ValueError(message) if kind == "invalid" else RequestFailedError(message))
                return
        if finish == "error":
            self.fail(RequestFailedError("internal error while decoding this request"))
            return
        self.finish_reason = finish
        self._wake()

    def restart(self) -> None:
        """Its engine was lost before the consumer saw anything: start over on the next one."""
        self.tokens = []  # outputs handed out keep the old list (TokenIds)
        self.events.clear()
        self.stats = RequestStats()
        self.fresh = False
        self.submitted_epoch = None

    def finish_locally(self, reason: str) -> None:
        """End without the engine (an abort of a request no engine holds)."""
        self.finish_reason = reason
        self._wake()

    def fail(self, error: BaseException) -> None:
        if self.error is None and not self.finished:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        self.fresh = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> RequestOutput:
        """The next cumulative output; raises the request's error."""
        while not self.fresh:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        self.fresh = False
        if self.error is not None:
            raise self.error
        self.delivered = True
        return self.output()

    def output(self) -> RequestOutput:
        ids = TokenIds(self.tokens)
        stops = self.params.stop
        if self.finished:
            text = self.detokenizer.finish(ids)
            cut = first_stop(text, stops) if stops and self.finish_reason == "stop" else None
            text = text if cut is None else text[:cut]
        else:
            text = self.detokenizer.update(self.tokens)
            if stops:
                text = hold_back_stop_prefix(text, stops)
        events, self.events = tuple(self.events), []
        return RequestOutput(self.request_id, self.prompt_ids, ids, text, self.finished, self.finish_reason,
                             self.stats, events)
