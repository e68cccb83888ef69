"""Helpers for tests and examples: tiny random checkpoints in each family's real on-disk format."""

from optimus.testing.checkpoints import FAMILIES, make_tiny_checkpoint, make_tiny_model

__all__ = ["FAMILIES", "make_tiny_checkpoint", "make_tiny_model"]
