"""What crosses the Ray boundary between the ingress and a replica: plain frozen dataclasses.

A replica streams one ``StreamDelta`` per engine output of a request (or one ``Refusal`` and
nothing else). Invariant: applying a request's deltas in order to an empty answer rebuilds the
replica's cumulative ``RequestOutput`` exactly (``Rebuild``), so only what changed travels."""

from __future__ import annotations

from dataclasses import dataclass, field

from optimus.core.errors import EngineDeadError, QueueFullError, RequestFailedError
from optimus.core.outputs import CommitEvent, RequestOutput, RequestStats, TokenIds, extended
from optimus.engine.model_facts import ModelFacts
from optimus.engine.stats import EngineMetrics


@dataclass(frozen=True)
class ReplicaInfo(ModelFacts):
    """A loaded replica's model facts, and where it runs."""

    pid: int
    node: str


@dataclass(frozen=True)
class ReplicaStatus:
    """One replica's load, as polled by the ingress. ``queue_depth`` = running + waiting."""

    ready: bool
    pid: int
    metrics: EngineMetrics = field(default_factory=EngineMetrics)

    @property
    def queue_depth(self) -> int:
        return self.metrics.running + self.metrics.waiting


@dataclass(frozen=True)
class StreamDelta:
    """One output of a request: ``token_ids[:base]`` and ``text[:text_base]`` are unchanged
    since the previous delta; ``new_ids`` and ``new_text`` replace what followed."""

    base: int
    new_ids: tuple[int, ...]
    text_base: int
    new_text: str
    finished: bool
    finish_reason: str | None
    stats: RequestStats | None  # with the last delta only
    events: tuple[CommitEvent, ...] = ()


@dataclass(frozen=True)
class Refusal:
    """The replica did not run the request (or ended it with an error)."""

    kind: str  # "queue_full" | "invalid" | "dead" | "failed"
    message: str

    def error(self) -> BaseException:
        if self.kind == "queue_full":
            return QueueFullError(self.message)
        if self.kind == "invalid":
            return ValueError(self.message)
        if self.kind == "dead":
            return EngineDeadError(self.message)
        return RequestFailedError("internal error while decoding this request")


def refusal_of(exc: BaseException) -> Refusal:
    """The ``Refusal`` for an exception ``AsyncEngine.generate`` or ``score`` raised."""
    if isinstance(exc, QueueFullError):
        return Refusal("queue_full", str(exc))
    if isinstance(exc, EngineDeadError):
        return Refusal("dead", str(exc))
    if isinstance(exc, ValueError):
        return Refusal("invalid", str(exc))
    return Refusal("failed", f"{type(exc).__name__}")


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    if isinstance(a, TokenIds) and a.shares_list(b):  # a request's outputs: views of one growing answer
        return n
    if a[:n] == b[:n]:
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def delta_of(previous: RequestOutput | None, output: RequestOutput, events: bool) -> StreamDelta:
    """The delta that takes ``previous`` (None: nothing yet) to ``output``."""
    ids, text = (previous.token_ids, previous.text) if previous is not None else ((), "")
    base, text_base = _common_prefix(ids, output.token_ids), _common_prefix(text, output.text)
    return StreamDelta(base, tuple(output.token_ids[base:]), text_base, output.text[text_base:], output.finished,
                       output.finish_reason, output.stats if output.finished else None,
                       tuple(output.events) if events else ())


class Rebuild:
    """The ingress side of one request's stream: deltas -> cumulative ``RequestOutput``."""

    def __init__(self, request_id: str, prompt_ids: tuple[int, ...]) -> None:
        self.request_id, self.prompt_ids = request_id, prompt_ids
        self.ids: list[int] = []  # grows at its end; a resend replaces it (outputs handed out are views)
        self.text = ""
        self.stats = RequestStats()

    def apply(self, delta: StreamDelta) -> RequestOutput:
        self.ids = extended(self.ids, delta.base, delta.new_ids)
        self.text = self.text[:delta.text_base] + delta.new_text
        if delta.stats is not None:
            self.stats = delta.stats
        return RequestOutput(self.request_id, self.prompt_ids, TokenIds(self.ids), self.text, delta.finished,
                             delta.finish_reason, self.stats, delta.events)
