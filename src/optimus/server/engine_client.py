"""What the server needs from an engine. Two implementations: ``AsyncEngine`` (the step loop in a
thread of this process: ``LLM``-style use, tests, ``--no-engine-process``) and ``RemoteEngine``
(an HTTP front-end of ``optimus serve``, the step loop in its own process); tests pass fakes.
Server code never knows which one it talks to."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol

from optimus.core.outputs import RequestOutput
from optimus.core.params import SamplingParams
from optimus.core.scoring import ScoreRequest, ScoreResult
from optimus.models.spec import ModelSpec


class EngineClient(Protocol):
    ready: bool  # the model is loaded and the loop runs
    alive: bool  # False once the engine cannot serve (sticky)
    on_dead: Callable[[], None] | None  # called once when ``alive`` turns False

    @property
    def tokenizer(self): ...  # optimus.models.tokenizer.Tokenizer

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def block_size(self) -> int: ...  # the denoising block requests decode in

    @property
    def model_name(self) -> str: ...

    async def start(self) -> None: ...

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 group: str | None = None, events: bool = False) -> AsyncIterator[RequestOutput]: ...
    # ``events``: the outputs carry the commit events (the web page's canvas); others may omit them

    async def score(self, request: ScoreRequest) -> ScoreResult: ...  # plain data both ways

    def abort(self, request_id: str) -> None: ...

    def metrics(self): ...  # optimus.engine.async_engine.EngineMetrics

    def stop_admitting(self) -> None: ...

    async def drain(self, timeout: float) -> None: ...

    async def shutdown(self) -> None: ...

    def mark_dead(self, why: str) -> None: ...
