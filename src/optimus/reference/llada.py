"""LLaDA's semi-autoregressive masked-diffusion sampler (ML-GSAI/LLaDA ``generate``).

The canvas of ``gen_length`` masks is split into blocks of ``block_length``; each block gets
``steps // num_blocks`` steps. A step runs the whole sequence (no cache), proposes
``x0 = argmax(gumbel(logits, T))`` everywhere, scores it (softmax probability of ``x0`` in
the model's dtype, or uniform noise for ``random``), forbids positions after the current
block, and commits the top-k masked positions, k following :func:`get_num_transfer_tokens`.

Parity notes: the Gumbel noise is drawn in float64 over the full [B, T, V] logits (so the RNG
stream matches), no noise is drawn at temperature 0, and the top-k runs per row over the
full-length confidence vector with ``torch.topk``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from optimus.models.transformer import DecoderLM
from optimus.reference.adapter import ModelCall, as_batch
from optimus.reference.stats import DecodeResult, DecodeStats, Stopwatch

REMASKING = ("low_confidence", "random")


def add_gumbel_noise(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Gumbel-max in float64: ``exp(logits) / (-log u)^T``; the identity at temperature 0."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits, dtype=torch.float64)
    return logits.exp() / (-torch.log(noise)) ** temperature


def get_num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """mask_index [B, L] -> commits per step [B, steps] (int64): ``n // steps`` each, the first
    ``n % steps`` steps one more, so each row sums to its mask count."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base, remainder = mask_num // steps, mask_num % steps
    counts = torch.zeros(mask_num.shape[0], steps, device=mask_index.device, dtype=torch.int64) + base
    for row in range(mask_num.shape[0]):
        counts[row, :int(remainder[row])] += 1
    return counts


def check_blocks(steps: int, gen_length: int, block_length: int) -> int:
    """Steps per block; the published loop asserts these divisibilities."""
    if min(steps, gen_length, block_length) <= 0:
        raise ValueError(f"steps={steps}, gen_length={gen_length}, block_length={block_length} must be positive")
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} must be a multiple of block_length={block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps={steps} must be a multiple of the number of blocks ({num_blocks})")
    return steps // num_blocks


def new_canvas(prompt: torch.Tensor, gen_length: int, mask_id: int) -> torch.Tensor:
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long,
                   device=prompt.device)
    x[:, :prompt.shape[1]] = prompt
    return x


def _logits(call: ModelCall, x: torch.Tensor, prompt_index: torch.Tensor, mask_id: int,
            cfg_scale: float) -> torch.Tensor:
    """Raw logits [B, T, V]; with classifier-free guidance the conditional and the
    prompt-masked sequence run as one batch of 2B."""
    if cfg_scale <= 0:
        return call(x)[0]
    unconditional = x.clone()
    unconditional[prompt_index] = mask_id
    logits = call(torch.cat([x, unconditional], dim=0))[0]
    cond, uncond = torch.chunk(logits, 2, dim=0)
    return uncond + (cfg_scale + 1) * (cond - uncond)


def _scores(logits: torch.Tensor, x0: torch.Tensor, remasking: str) -> torch.Tensor:
    if remasking == "low_confidence":
        p = F.softmax(logits, dim=-1)  # the model's dtype, as LLaDA does
        return torch.gather(p, -1, x0[..., None]).squeeze(-1)
    return torch.rand(x0.shape, device=x0.device)


@torch.no_grad()
def generate(model: DecoderLM, prompt_ids: torch.Tensor, *, steps: int, gen_length: int,
             block_length: int, temperature: float = 0.0, remasking: str = "low_confidence",
             mask_id: int | None = None, cfg_scale: float = 0.0) -> DecodeResult:
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    steps_per_block = check_blocks(steps, gen_length, block_length)
    call = ModelCall(model)
    mask_id = call.mask_id(mask_id)
    prompt = as_batch(prompt_ids, call.device)
    clock = Stopwatch(call.device)
    x = new_canvas(prompt, gen_length, mask_id)
    prompt_index = x != mask_id
    p_len, committed = prompt.shape[1], 0
    for block in range(gen_length // block_length):
        lo, hi = p_len + block * block_length, p_len + (block + 1) * block_length
        schedule = get_num_transfer_tokens(x[:, lo:hi] == mask_id, steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == mask_id
            logits = _logits(call, x, prompt_index, mask_id, cfg_scale)
            x0 = torch.argmax(add_gumbel_noise(logits, temperature), dim=-1)
            x0_p = _scores(logits, x0, remasking)
            x0_p[:, hi:] = -torch.inf  # nothing after the current block commits early
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for row in range(confidence.shape[0]):
                _, picked = torch.topk(confidence[row], k=int(schedule[row, i]))
                transfer[row, picked] = True
            committed += int((transfer & mask_index).sum())
            x[transfer] = x0[transfer]
    return DecodeResult(x, p_len, DecodeStats(call.forwards, committed, clock.elapsed()))
