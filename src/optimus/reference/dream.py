"""Dream's diffusion sampler (DreamLM/Dream ``generation_utils.py``: ``diffusion_generate`` /
``_sample``).

The whole canvas decodes at once (no blocks, no cache). Timesteps are
``linspace(1, eps, steps + 1)`` in float32; step i commits ``int(n_masked * (1 - s / t))``
masked positions (the last step all the rest), ranked by confidence:
``maskgit_plus`` (probability of x0), ``topk_margin`` (top-1 minus top-2 probability) or
``entropy`` (negative entropy); ``origin`` instead reveals each mask with probability
``1 - s / t``. Logits are shifted: position i reads row i-1 (row 0 its own). With left padding
(an ``attention_mask`` with zeros) positions are the running count of real tokens minus one
and padding neither attends nor is attended to. Everything runs in the logits' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributions as dists
import torch.nn.functional as F

from optimus.models.dense import shift_logits
from optimus.models.transformer import DecoderLM
from optimus.reference.adapter import ModelCall, as_batch
from optimus.reference.stats import DecodeResult, DecodeStats, Stopwatch

ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def top_p_logits(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True)
    drop = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1) > top_p
    drop[..., 1:] = drop[..., :-1].clone()
    drop[..., 0] = False
    drop = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, drop)
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def top_k_logits(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(top_k, logits.shape[-1])
    drop = logits < torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def sample_tokens(logits: torch.Tensor, temperature: float = 0.0, top_p: float | None = None,
                  top_k: int | None = None, alg: str = "maskgit_plus") -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] -> (confidence [N], x0 [N]) for the named confidence."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    confidence, x0 = _draw(probs, temperature)
    if alg == "topk_margin":
        ranked = torch.sort(probs, dim=-1, descending=True)[0]
        confidence = ranked[:, 0] - ranked[:, 1]
    elif alg == "entropy":
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def _draw(probs: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    if temperature > 0:
        try:
            x0 = dists.Categorical(probs=probs).sample()
            return torch.gather(probs, -1, x0[:, None]).squeeze(-1), x0
        except (ValueError, RuntimeError):  # invalid probabilities: Dream falls back to the max
            pass
    return probs.max(dim=-1)


def _positions_and_mask(attention_mask: torch.Tensor | None, total: int):
    """(positions [B, T] or None, boolean mask [B, T, T] or None) for a left-padded batch."""
    if attention_mask is None or bool((attention_mask != 0).all()):
        return None, None
    b, p = attention_mask.shape
    real = F.pad(attention_mask.bool(), (0, total - p), value=True)
    positions = real.long().cumsum(-1) - 1
    positions.masked_fill_(~real, 1)
    return positions, real[:, None, :] & real[:, :, None]


@dataclass(frozen=True)
class _Options:
    alg: str
    temperature: float
    top_p: float | None
    top_k: int | None
    alg_temp: float | None
    mask_id: int

    def sample(self, logits: torch.Tensor, alg: str = "maskgit_plus") -> tuple[torch.Tensor, torch.Tensor]:
        return sample_tokens(logits, self.temperature, self.top_p, self.top_k, alg)


@torch.no_grad()
def diffusion_generate(model: DecoderLM, prompt_ids, *, max_new_tokens: int, steps: int,
                       alg: str = "maskgit_plus", temperature: float = 0.0, top_p: float | None = None,
                       top_k: int | None = None, alg_temp: float | None = None, eps: float = 1e-3,
                       attention_mask: torch.Tensor | None = None, mask_id: int | None = None) -> DecodeResult:
    if alg not in ALGORITHMS:
        raise ValueError(f"alg must be one of {ALGORITHMS}, got {alg!r}")
    if max_new_tokens <= 0 or steps <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} and steps={steps} must be positive")
    call = ModelCall(model)
    opts = _Options(alg, temperature, top_p, top_k, alg_temp, call.mask_id(mask_id))
    prompt = as_batch(prompt_ids, call.device)
    clock = Stopwatch(call.device)
    x = F.pad(prompt, (0, max_new_tokens), value=opts.mask_id)
    if attention_mask is not None:
        attention_mask = attention_mask.to(call.device)
    positions, mask = _positions_and_mask(attention_mask, x.shape[1])
    timesteps = torch.linspace(1, eps, steps + 1, device=x.device)
    committed = 0
    for i in range(steps):
        mask_index = x == opts.mask_id
        logits = shift_logits(call(x, mask=mask, positions=positions)[0])
        t, s = timesteps[i], timesteps[i + 1]
        last = i == steps - 1
        if alg == "origin":
            _reveal(x, logits, mask_index, 1 if last else 1 - s / t, opts)
        else:
            _commit_ranked(x, logits, mask_index, None if last else 1 - s / t, opts)
        committed += int(mask_index.sum()) - int((x == opts.mask_id).sum())
    return DecodeResult(x, prompt.shape[1], DecodeStats(call.forwards, committed, clock.elapsed()))


def _reveal(x: torch.Tensor, logits: torch.Tensor, mask_index: torch.Tensor, p_transfer, opts: _Options) -> None:
    """``origin``: each mask independently becomes a sampled token with probability p_transfer."""
    x0 = torch.zeros_like(x[mask_index]) + opts.mask_id
    reveal = torch.rand(*x0.shape, device=x.device) < p_transfer
    _, x0[reveal] = opts.sample(logits[mask_index][reveal])
    x[mask_index] = x0.clone()


def _commit_ranked(x: torch.Tensor, logits: torch.Tensor, mask_index: torch.Tensor,
                   fraction: torch.Tensor | None, opts: _Options) -> None:
    """Commit the ``int(n_masked * fraction)`` most confident masks; all of them when
    ``fraction`` is None (the last step). x [B, T], logits [B, T, V] (already shifted)."""
    confidence, x0 = opts.sample(logits[mask_index], opts.alg)
    n_masked = mask_index.sum() / mask_index.shape[0]  # a float32 tensor, as published
    count = int(n_masked) if fraction is None else int(n_masked * fraction)
    if count <= 0:
        return
    full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
    full_confidence[mask_index] = confidence
    if opts.alg_temp is None or opts.alg_temp == 0:
        _, picked = torch.topk(full_confidence, count)
    else:
        weights = F.softmax(full_confidence / opts.alg_temp, dim=-1)
        picked = torch.multinomial(weights, num_samples=count)
    proposal = torch.zeros_like(x) + opts.mask_id
    proposal[mask_index] = x0.clone()
    rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(picked)
    x[rows, picked] = proposal[rows, picked]
