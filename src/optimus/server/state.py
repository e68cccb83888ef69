"""What the route handlers share: the engine, the server config, metrics and lifecycle."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from optimus.config import ServerConfig
from optimus.server.engine_client import EngineClient
from optimus.server.errors import APIError, bad_request
from optimus.server.lifecycle import Lifecycle
from optimus.server.metrics import ServerMetrics
from optimus.server.prompts import PromptLimits


@dataclass
class ServerState:
    engine: EngineClient
    config: ServerConfig
    metrics: ServerMetrics
    lifecycle: Lifecycle
    created: int = field(default_factory=lambda: int(time.time()))
    frontend: int = 0  # which HTTP front-end process this is (several share the port)

    @property
    def model_id(self) -> str:
        return self.config.served_model_name or self.engine.model_name

    def limits(self) -> PromptLimits:
        # No --max-tokens-cap: the model's context is the only cap (the prompt's room under it
        # is checked per request).
        cap = self.config.max_tokens_cap
        return PromptLimits(vocab_size=self.engine.spec.arch.vocab_size,
                            max_model_len=self.engine.max_model_len,
                            max_tokens_cap=self.engine.max_model_len if cap is None else cap)

    def admit(self, model: str | None) -> None:
        """Refuse API calls while the engine is not ready, and for another model."""
        refusal = self.lifecycle.admission_error()
        if refusal is not None:
            self.metrics.rejected.labels(refusal.code).inc()
            raise refusal
        if model is not None and model != self.model_id:
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                                f"`{self.model_id}`.", param="model", code="model_not_found")

    def check_n(self, n: int) -> None:
        if n > self.config.max_n:
            raise bad_request(f"n: at most {self.config.max_n} choices per request, got {n}", "n")
