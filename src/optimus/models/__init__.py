"""Native PyTorch model families and the registry that maps a checkpoint to one."""

from optimus.models.spec import ArchConfig, AttentionKind, ModelSpec
from optimus.models.transformer import DecoderLM

__all__ = ["ArchConfig", "AttentionKind", "ModelSpec", "DecoderLM"]
