"""Reference decoders: the published dLLM sampling loops, single request, plain torch.

Each function takes our :class:`~optimus.models.transformer.DecoderLM` (its ``spec`` gives the
mask id and attention kind) and returns a :class:`DecodeResult` (the published function's output
sequence plus :class:`DecodeStats`). They are the ground truth the engine is tested against.
"""

from optimus.reference.stats import DecodeResult, DecodeStats

__all__ = ["DecodeResult", "DecodeStats"]
