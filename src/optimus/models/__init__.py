"""Native PyTorch model families and the registry that maps a checkpoint to one."""

from optimus.models.spec import ArchConfig, AttentionKind, ModelSpec

__all__ = ["ArchConfig", "AttentionKind", "ModelSpec", "DecoderLM"]


def __getattr__(name: str):
    # The model (and torch) load on first use: the HTTP front-end process reads specs only.
    if name == "DecoderLM":
        from optimus.models.transformer import DecoderLM
        return DecoderLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
