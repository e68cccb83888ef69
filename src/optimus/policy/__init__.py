"""Chunk policies: how many positions of its current block each request processes per step."""

from optimus.policy.base import ChunkPolicy, RequestView, StepFeedback, StepView
from optimus.policy.registry import make_policy
from optimus.core.params import parse_policy_name

__all__ = ["ChunkPolicy", "RequestView", "StepFeedback", "StepView", "make_policy", "parse_policy_name"]
