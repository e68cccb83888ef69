"""Why a model cannot be loaded: one exception class per cause, each a ``ValueError`` whose
message is one line naming the file, field, tensor or repository (the CLI prints it as is)."""

from __future__ import annotations


class LoadError(ValueError):
    """A model cannot be loaded; the message names the file, field or tensor."""


class MissingFileError(LoadError):
    pass


class CorruptFileError(LoadError):
    """A weight file that cannot be read (empty, truncated, bad header)."""


class UnsafeFormatError(LoadError):
    """Pickle-based weights (``*.bin``, ``*.pt``...) are refused: loading them can run code."""


class ConfigFieldError(LoadError):
    """config.json is missing a field or holds a value out of range."""


class UnknownArchitectureError(ConfigFieldError):
    pass


class UnexpectedTensorError(LoadError):
    pass


class MissingTensorError(LoadError):
    pass


class ShapeMismatchError(LoadError):
    pass


class UnknownShapeError(LoadError):
    """``random:<shape>`` names no shape of :data:`optimus.models.shapes.SHAPES`."""


class UnsupportedFormatError(LoadError):
    """A file in a format this engine reads, holding something it does not (a GGUF tensor type,
    tokenizer or architecture)."""


class RepoNotFoundError(MissingFileError):
    """A Hugging Face Hub id that names no repository (or a private one without a token)."""


class HubAccessError(LoadError):
    """A gated repository without a token that has access, or a missing revision."""


class OfflineError(LoadError):
    """The Hub (or PyPI) cannot be reached and no cached copy exists."""


class ChecksumError(LoadError):
    """A downloaded file whose sha256 is not the pinned one; it was discarded."""
