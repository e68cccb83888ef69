"""Fast-dLLM on LLaDA-style models (NVlabs/Fast-dLLM ``llada/generate.py``).

Three loops share one step: propose ``x0`` (Gumbel-max in float64, identity at T=0), score it,
and let a :mod:`commit rule <optimus.reference.rules>` pick positions of the current block:
``threshold`` (Fast-dLLM parallel decoding), ``factor``, or LLaDA's top-k schedule when
neither is given. A block ends when it has no mask left.

- :func:`generate`: no cache; every step runs the whole sequence.
- :func:`generate_with_prefix_cache`: a block starts with a full forward that refreshes the
  K/V of everything before the block and commits that step; later steps run the block and
  everything after it against that prefix.
- :func:`generate_with_dual_cache`: the block-start forward caches the whole sequence; later
  steps run only the block and overwrite its cache slots.

Confidence is the probability of ``x0``; ``confidence_dtype`` float32 computes it as
``exp(logit - logsumexp)`` (DESIGN.md section 5), float64 as ``softmax(logits.double())``
(the variant in the NVlabs file we could read). ``random`` remasking draws float32 uniforms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from optimus.models.dense import CacheMode
from optimus.models.transformer import DecoderLM
from optimus.reference.adapter import ModelCall, as_batch
from optimus.reference.llada import REMASKING, add_gumbel_noise, check_blocks, get_num_transfer_tokens, new_canvas
from optimus.reference.rules import CommitRule, Factor, Threshold, TopKSchedule
from optimus.reference.stats import DecodeResult, DecodeStats, Stopwatch


def confidence_of(logits: torch.Tensor, x0: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Probability of ``x0`` [B, L] under ``logits`` [B, L, V], computed in ``dtype``."""
    if dtype == torch.float64:
        p = F.softmax(logits.to(torch.float64), dim=-1)
        return torch.gather(p, -1, x0[..., None]).squeeze(-1)
    logits = logits.to(dtype)
    chosen = torch.gather(logits, -1, x0[..., None]).squeeze(-1)
    return torch.exp(chosen - torch.logsumexp(logits, dim=-1))


class _Stepper:
    """One Fast-dLLM step on a window of the canvas: propose, score, commit in place."""

    def __init__(self, temperature: float, remasking: str, confidence_dtype: torch.dtype) -> None:
        if remasking not in REMASKING:
            raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
        self.temperature, self.remasking, self.confidence_dtype = temperature, remasking, confidence_dtype
        self.rule: CommitRule | None = None  # set per block (the top-k schedule is per block)
        self.committed = 0

    def commit(self, logits: torch.Tensor, window: torch.Tensor, mask_index: torch.Tensor, step: int) -> None:
        """logits [B, L, V] for ``window`` [B, L] (a view into the canvas, updated in place);
        ``mask_index`` [B, L] marks the positions allowed to commit; ``step`` counts from the
        block's first step."""
        x0 = torch.argmax(add_gumbel_noise(logits, self.temperature), dim=-1)
        if self.remasking == "low_confidence":
            x0_p = confidence_of(logits, x0, self.confidence_dtype)
        else:
            x0_p = torch.rand(x0.shape, device=x0.device)
        x0 = torch.where(mask_index, x0, window)
        confidence = torch.where(mask_index, x0_p, -torch.inf)
        transfer = self.rule.select(confidence, mask_index, step)
        self.committed += int(transfer.sum())
        window[transfer] = x0[transfer]


def _rule(threshold: float | None, factor: float | None, counts: torch.Tensor) -> CommitRule:
    if factor is not None:
        return Factor(factor)
    if threshold is not None:
        return Threshold(threshold)
    return TopKSchedule(counts)


class _Setup:
    """The state every variant starts from: canvas, block geometry, model call, clock."""

    def __init__(self, model: DecoderLM, prompt_ids, steps: int, gen_length: int, block_length: int,
                 mask_id: int | None) -> None:
        self.steps_per_block = check_blocks(steps, gen_length, block_length)
        self.call = ModelCall(model)
        self.mask_id = self.call.mask_id(mask_id)
        prompt = as_batch(prompt_ids, self.call.device)
        self.clock = Stopwatch(self.call.device)
        self.x = new_canvas(prompt, gen_length, self.mask_id)
        self.prompt_length, self.block_length = prompt.shape[1], block_length
        self.num_blocks = gen_length // block_length

    def bounds(self, block: int) -> tuple[int, int]:
        lo = self.prompt_length + block * self.block_length
        return lo, lo + self.block_length

    def block_done(self, lo: int, hi: int) -> bool:
        return not bool((self.x[:, lo:hi] == self.mask_id).any())

    def result(self, stepper: _Stepper) -> DecodeResult:
        stats = DecodeStats(self.call.forwards, stepper.committed, self.clock.elapsed())
        return DecodeResult(self.x, self.prompt_length, stats)


def _full_step(s: _Setup, stepper: _Stepper, hi: int, step: int, mode: CacheMode = CacheMode.READ):
    """A step over the whole sequence; positions from ``hi`` on may not commit."""
    logits, cache = s.call(s.x, 0, None, mode)
    mask_index = s.x == s.mask_id
    mask_index[:, hi:] = False
    stepper.commit(logits, s.x, mask_index, step)
    return cache


@torch.no_grad()
def generate(model: DecoderLM, prompt_ids, *, steps: int, gen_length: int, block_length: int,
             temperature: float = 0.0, remasking: str = "low_confidence", mask_id: int | None = None,
             threshold: float | None = None, factor: float | None = None,
             confidence_dtype: torch.dtype = torch.float32) -> DecodeResult:
    s = _Setup(model, prompt_ids, steps, gen_length, block_length, mask_id)
    stepper = _Stepper(temperature, remasking, confidence_dtype)
    for block in range(s.num_blocks):
        lo, hi = s.bounds(block)
        counts = get_num_transfer_tokens(s.x[:, lo:hi] == s.mask_id, s.steps_per_block)
        stepper.rule = _rule(threshold, factor, counts)
        step = 0
        while True:
            _full_step(s, stepper, hi, step)
            step += 1
            if s.block_done(lo, hi):
                break
    return s.result(stepper)


@torch.no_grad()
def generate_with_prefix_cache(model: DecoderLM, prompt_ids, *, steps: int, gen_length: int,
                               block_length: int, temperature: float = 0.0, remasking: str = "low_confidence",
                               mask_id: int | None = None, threshold: float | None = None,
                               factor: float | None = None,
                               confidence_dtype: torch.dtype = torch.float32) -> DecodeResult:
    s = _Setup(model, prompt_ids, steps, gen_length, block_length, mask_id)
    stepper = _Stepper(temperature, remasking, confidence_dtype)
    for block in range(s.num_blocks):
        lo, hi = s.bounds(block)
        counts = get_num_transfer_tokens(s.x[:, lo:hi] == s.mask_id, s.steps_per_block)
        stepper.rule = _rule(threshold, factor, counts)
        prefix = _full_step(s, stepper, hi, 0, CacheMode.APPEND).truncate(lo)
        step = 1
        while not s.block_done(lo, hi):
            logits, _ = s.call(s.x[:, lo:], lo, prefix, CacheMode.READ)
            # The published loop draws (and discards) one extra noise sample here; drawing it
            # keeps the RNG stream, hence sampled outputs, identical.
            add_gumbel_noise(logits, temperature)
            mask_index = s.x[:, lo:] == s.mask_id
            mask_index[:, block_length:] = False
            stepper.commit(logits, s.x[:, lo:], mask_index, step)
            step += 1
    return s.result(stepper)


@torch.no_grad()
def generate_with_dual_cache(model: DecoderLM, prompt_ids, *, steps: int, gen_length: int,
                             block_length: int, temperature: float = 0.0, remasking: str = "low_confidence",
                             mask_id: int | None = None, threshold: float | None = None,
                             factor: float | None = None,
                             confidence_dtype: torch.dtype = torch.float32) -> DecodeResult:
    s = _Setup(model, prompt_ids, steps, gen_length, block_length, mask_id)
    stepper = _Stepper(temperature, remasking, confidence_dtype)
    for block in range(s.num_blocks):
        lo, hi = s.bounds(block)
        counts = get_num_transfer_tokens(s.x[:, lo:hi] == s.mask_id, s.steps_per_block)
        stepper.rule = _rule(threshold, factor, counts)
        cache = _full_step(s, stepper, hi, 0, CacheMode.APPEND)
        step = 1
        while not s.block_done(lo, hi):
            window = s.x[:, lo:hi]
            logits, cache = s.call(window, lo, cache, CacheMode.REPLACE)
            stepper.commit(logits, window, window == s.mask_id, step)
            step += 1
    return s.result(stepper)

