"""Chunk policies: how many positions of its current block each request processes per step."""

from optimus.engine.policies.base import (
    ChunkPolicy, RequestView, StepFeedback, StepView, make_policy, parse_policy_name,
)

__all__ = ["ChunkPolicy", "RequestView", "StepFeedback", "StepView", "make_policy", "parse_policy_name"]
