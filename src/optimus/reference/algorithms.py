"""Names for the reference decoders and the mapping from a few user-level settings
(``max_tokens``, ``steps``, ``block_length``, ``threshold``, ``temperature``) to each one's
published parameters. Used by ``optimus generate``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from optimus.models.spec import AttentionKind, ModelSpec
from optimus.models.transformer import DecoderLM
from optimus.reference import ar, dream, fast_dllm, llada, sdar
from optimus.reference.stats import DecodeResult

LLADA_BLOCK = 32  # LLaDA's usual semi-autoregressive block
FAST_DLLM_THRESHOLD = 0.9  # Fast-dLLM's parallel-decoding threshold
SDAR_THRESHOLD = 0.85  # SDAR generate.py's default for low_confidence_dynamic
DREAM_ALG = "entropy"  # the confidence Dream's README samples with


@dataclass(frozen=True)
class DecodeSettings:
    max_tokens: int = 64
    steps: int | None = None  # None: one token per step (LLaDA, Dream), the block size (SDAR)
    block_length: int | None = None  # None: 32 for LLaDA-style, the trained block for SDAR
    threshold: float | None = None  # None: each algorithm's published default
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        for name in ("steps", "block_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


def natural_algorithm(spec: ModelSpec) -> str:
    """The decoder a family ships with: LLaDA's, Dream's, SDAR's, or AR for causal LMs."""
    if spec.attention is AttentionKind.CAUSAL:
        return "ar"
    if spec.attention is AttentionKind.BLOCK_CAUSAL:
        return "sdar"
    return "dream" if spec.logit_shift else "llada"


def _llada_geometry(s: DecodeSettings) -> dict:
    """Canvas rounded up to whole blocks; one token per step unless ``steps`` says otherwise."""
    block = s.block_length or min(LLADA_BLOCK, s.max_tokens)
    gen = -(-s.max_tokens // block) * block
    return {"gen_length": gen, "block_length": block, "steps": s.steps or gen}


def _no_threshold(name: str, s: DecodeSettings) -> None:
    if s.threshold is not None:
        raise ValueError(f"--threshold does not apply to {name}; use fast-dllm, fast-dllm-prefix, "
                         "fast-dllm-dual or sdar")


def _llada(model: DecoderLM, prompt: torch.Tensor, s: DecodeSettings) -> DecodeResult:
    _no_threshold("llada", s)
    return llada.generate(model, prompt, temperature=s.temperature, **_llada_geometry(s))


def _fast_dllm(variant: Callable[..., DecodeResult]) -> Callable[[DecoderLM, torch.Tensor, DecodeSettings], DecodeResult]:
    def run(model: DecoderLM, prompt: torch.Tensor, s: DecodeSettings) -> DecodeResult:
        threshold = s.threshold if s.threshold is not None else FAST_DLLM_THRESHOLD
        return variant(model, prompt, temperature=s.temperature, threshold=threshold, **_llada_geometry(s))
    return run


def _sdar(model: DecoderLM, prompt: torch.Tensor, s: DecodeSettings) -> DecodeResult:
    threshold = s.threshold if s.threshold is not None else SDAR_THRESHOLD
    return sdar.block_diffusion_generate(
        model, prompt, gen_length=s.max_tokens, block_length=s.block_length, denoising_steps=s.steps,
        temperature=s.temperature, confidence_threshold=threshold, stop_ids=model.spec.eos_ids)


def _dream(model: DecoderLM, prompt: torch.Tensor, s: DecodeSettings) -> DecodeResult:
    _no_threshold("dream", s)
    return dream.diffusion_generate(model, prompt, max_new_tokens=s.max_tokens, steps=s.steps or s.max_tokens,
                                    alg=DREAM_ALG, temperature=s.temperature)


def _ar(model: DecoderLM, prompt: torch.Tensor, s: DecodeSettings) -> DecodeResult:
    _no_threshold("ar", s)
    return ar.generate(model, prompt, max_new_tokens=s.max_tokens, temperature=s.temperature,
                       stop_ids=model.spec.eos_ids)


ALGORITHMS: dict[str, Callable[[DecoderLM, torch.Tensor, DecodeSettings], DecodeResult]] = {
    "llada": _llada,
    "fast-dllm": _fast_dllm(fast_dllm.generate),
    "fast-dllm-prefix": _fast_dllm(fast_dllm.generate_with_prefix_cache),
    "fast-dllm-dual": _fast_dllm(fast_dllm.generate_with_dual_cache),
    "sdar": _sdar,
    "dream": _dream,
    "ar": _ar,
}


def decode(name: str, model: DecoderLM, prompt_ids, settings: DecodeSettings) -> DecodeResult:
    """Run algorithm ``name`` ("auto" = the model's natural one) on one prompt."""
    if name == "auto":
        name = natural_algorithm(model.spec)
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose auto or one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name](model, prompt_ids, settings)


def answer_ids(generated: torch.Tensor, spec: ModelSpec, max_tokens: int) -> list[int]:
    """The answer in one generated row [G]: at most ``max_tokens``, cut at the first end id,
    without masks (a decoder that stopped early leaves later blocks masked)."""
    ids = [int(t) for t in generated[:max_tokens]]
    ends = set(spec.eos_ids)
    cut = next((i for i, t in enumerate(ids) if t in ends), len(ids))
    return [t for t in ids[:cut] if t != spec.mask_id]
