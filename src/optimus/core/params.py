"""Per-request sampling and decoding parameters (validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass, field

DECODING_RULES = ("threshold", "topk", "factor")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    rule: str = "threshold"  # how a step decides which masked positions of the chunk to commit
    threshold: float = 0.9  # rule=threshold: commit every position at least this confident
    tokens_per_step: int = 1  # rule=topk: commit this many per step
    factor: float = 1.0  # rule=factor: n-th most confident must reach 1 - factor / (n + 1) (Fast-dLLM)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    policy: str | None = None  # per-request chunk policy override ("ar", "fixed:C", "elastic")
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        self.validate()

    def validate(self) -> None:
        def bad(field_name: str, why: str) -> None:
            raise ValueError(f"{field_name}: {why}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            bad("temperature", f"must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            bad("top_k", f"must be >= 0 (0 disables it), got {self.top_k}")
        if self.rule not in DECODING_RULES:
            bad("rule", f"must be one of {DECODING_RULES}, got {self.rule!r}")
        if not 0.0 < self.threshold <= 1.0:
            bad("threshold", f"must be in (0, 1], got {self.threshold}")
        if self.tokens_per_step < 1:
            bad("tokens_per_step", f"must be >= 1, got {self.tokens_per_step}")
        if self.factor <= 0:
            bad("factor", f"must be > 0, got {self.factor}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            bad("min_tokens", f"must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if any(not s for s in self.stop):
            bad("stop", "stop strings must be non-empty")
        if len(self.stop) > 16:
            bad("stop", "at most 16 stop strings")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            bad("seed", f"must be in [0, 2^63), got {self.seed}")
        if self.policy is not None:
            from optimus.core.params import parse_policy_name
            parse_policy_name(self.policy)


def parse_policy_name(name: str) -> tuple[str, int | None]:
    """'ar' | 'fixed:C' | 'elastic' -> (kind, C). Raises ValueError naming the problem."""
    if name == "ar":
        return "ar", 1
    if name == "elastic":
        return "elastic", None
    if name.startswith("fixed:"):
        try:
            c = int(name.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"policy {name!r}: chunk size must be an integer, as in 'fixed:8'") from None
        if c < 1:
            raise ValueError(f"policy {name!r}: chunk size must be >= 1")
        return "fixed", c
    raise ValueError(f"unknown policy {name!r}; expected 'ar', 'fixed:C' or 'elastic'")
