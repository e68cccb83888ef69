"""What the engine hands back to callers: per-request outputs, statistics and commit events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass
class RequestStats:
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    steps: int = 0  # steps this request took part in while decoding
    tokens_computed: int = 0  # canvas positions run through the model (chunk + commit groups)
    tokens_committed: int = 0
    chunk_sizes: dict[int, int] = field(default_factory=dict)  # chunk size -> steps at that size
    committed_per_chunk: dict[int, int] = field(default_factory=dict)  # chunk size -> tokens committed
    chunk_history: list[int] = field(default_factory=list)  # window size of each decode step that committed, in order
    preemptions: int = 0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens_committed / self.steps if self.steps else 0.0


class CommitEvent(NamedTuple):  # a tuple: one is built per decoding request per step
    """Positions committed in one step; positions are offsets in the canvas (0 = first output)."""

    step: int
    chunk_start: int
    chunk_end: int
    positions: tuple[int, ...]
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]  # the contiguous committed prefix of the answer, stop-trimmed
    text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    stats: RequestStats
    events: tuple[CommitEvent, ...] = ()  # commits since the previous output of this request
