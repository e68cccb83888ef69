"""SDAR block diffusion (JetAstra/SDAR ``block_diffusion_generate``).

Geometry: blocks of ``block_length`` are aligned to absolute position 0. The ``P // B``
complete prompt blocks are prefilled into the cache; the prompt's tail (``P mod B`` tokens)
shares the first decode block with the first masks and is re-run with it every step. The
canvas is ``ceil((P + gen) / B) * B`` long, so the answer may run past ``gen_length``.

Per block: each step runs the block against the cache (block-causal: a block sees earlier
blocks and itself), samples ``x0`` with its confidence, and commits by strategy:
``sequential`` (leftmost masks first), ``low_confidence_static`` (top-k), or
``low_confidence_dynamic`` (every position above the threshold if there are at least k, else
top-k), k from ``get_num_transfer_tokens(B, steps)``. Once no mask is left, one more forward
stores the block's K/V (its logits unused). Optionally stop after a block containing a stop id.

Sampling: at temperature 0, ``x0`` is the argmax and its confidence its softmax probability.
Otherwise logits are divided by T (when T != 1), filtered by top-k then top-p, and sampled
with ``multinomial``; the confidence is the probability of the sampled token *before*
filtering (so top_k=1, SDAR's "greedy", still yields meaningful confidences), or after it
with ``filtered_confidence=True`` (the published generate.py we could read). Softmax runs in
the logits' dtype. A committed position is never re-committed (a top-k that must reach past
the block's last masks picks nothing more).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from optimus.models.dense import CacheMode, DenseKVCache
from optimus.models.spec import AttentionKind
from optimus.models.transformer import DecoderLM
from optimus.reference.adapter import ModelCall, as_batch
from optimus.reference.stats import DecodeResult, DecodeStats, Stopwatch

STRATEGIES = ("sequential", "low_confidence_static", "low_confidence_dynamic")


def get_num_transfer_tokens(block_length: int, steps: int) -> torch.Tensor:
    """[steps] int64: ``block_length // steps`` each, the first ``block_length % steps`` one more."""
    counts = torch.zeros(steps, dtype=torch.int64) + block_length // steps
    counts[:block_length % steps] += 1
    return counts


def top_k_logits(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0:
        return logits
    kth = torch.topk(logits, k)[0][..., -1, None]
    return torch.where(logits < kth, torch.full_like(logits, -torch.inf), logits)


def top_p_logits(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop the tail beyond cumulative probability ``p`` (the top token always stays)."""
    sorted_logits, order = torch.sort(logits, descending=True)
    drop = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1) > p
    drop[..., 1:] = drop[..., :-1].clone()
    drop[..., 0] = False
    drop = torch.scatter(torch.zeros_like(logits, dtype=torch.bool), -1, order, drop)
    return logits.masked_fill(drop, -torch.inf)


def sample(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
           filtered_confidence: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, L, V] -> (x0 [B, L], confidence [B, L])."""
    shape, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    if temperature == 0:
        token = torch.argmax(flat, dim=-1, keepdim=True)
        prob = torch.gather(F.softmax(flat, dim=-1), -1, token)
        return token.view(shape), prob.view(shape)
    scaled = flat / temperature if temperature != 1.0 else flat
    filtered = scaled
    if top_k > 0:
        filtered = top_k_logits(filtered, top_k)
    if top_p < 1.0:
        filtered = top_p_logits(filtered, top_p)
    probs = F.softmax(filtered, dim=-1)
    token = torch.multinomial(probs, num_samples=1)
    source = probs if filtered_confidence else F.softmax(scaled, dim=-1)
    return token.view(shape), torch.gather(source, -1, token).view(shape)


def _select(strategy: str, x0_p: torch.Tensor, mask_index: torch.Tensor, k: int,
            threshold: float) -> torch.Tensor:
    """Which positions of the block [B, B_len] commit this step."""
    transfer = torch.zeros_like(mask_index)
    confidence = torch.where(mask_index, x0_p, -torch.inf)
    for row in range(mask_index.shape[0]):
        if strategy == "sequential":
            first = int(mask_index[row].nonzero()[0, 0])
            transfer[row, first:first + k] = True
            continue
        if strategy == "low_confidence_dynamic":
            confident = confidence[row] > threshold
            if int(confident.sum()) >= k:
                transfer[row] = confident
                continue
        _, picked = torch.topk(confidence[row], k)
        transfer[row, picked] = True
    return transfer & mask_index


class _Blocks:
    """Canvas, block geometry and the growing cache of finished blocks."""

    def __init__(self, call: ModelCall, prompt: torch.Tensor, gen_length: int, block_length: int,
                 mask_id: int) -> None:
        self.call, self.block_length, self.mask_id = call, block_length, mask_id
        self.prompt_length = prompt.shape[1]
        self.num_blocks = -(-(self.prompt_length + gen_length) // block_length)
        self.x = torch.full((prompt.shape[0], self.num_blocks * block_length), mask_id,
                            dtype=torch.long, device=prompt.device)
        self.x[:, :self.prompt_length] = prompt
        self.prefill_blocks = self.prompt_length // block_length
        self.cache: DenseKVCache | None = None

    def prefill(self) -> None:
        end = self.prefill_blocks * self.block_length
        if end:
            _, self.cache = self.call(self.x[:, :end], 0, None, CacheMode.APPEND)

    def denoise(self, block: torch.Tensor, start: int) -> torch.Tensor:
        return self.call(block, start, self.cache, CacheMode.READ)[0]

    def store(self, block: torch.Tensor, start: int) -> None:
        _, self.cache = self.call(block, start, self.cache, CacheMode.APPEND)


@torch.no_grad()
def block_diffusion_generate(model: DecoderLM, prompt_ids, *, gen_length: int, block_length: int | None = None,
                             denoising_steps: int | None = None, temperature: float = 0.0, top_k: int = 0,
                             top_p: float = 1.0, remasking_strategy: str = "low_confidence_dynamic",
                             confidence_threshold: float = 0.85, stop_ids: tuple[int, ...] | None = None,
                             mask_id: int | None = None, filtered_confidence: bool = False) -> DecodeResult:
    if model.spec.attention is not AttentionKind.BLOCK_CAUSAL:
        raise ValueError(f"SDAR block diffusion needs a block-causal model; {model.spec.family!r} uses "
                         f"{model.spec.attention.value} attention")
    if remasking_strategy not in STRATEGIES:
        raise ValueError(f"remasking_strategy must be one of {STRATEGIES}, got {remasking_strategy!r}")
    block_length = block_length or model.spec.block_size
    steps = denoising_steps or block_length
    if not block_length or gen_length <= 0 or steps <= 0:
        raise ValueError(f"block_length={block_length}, gen_length={gen_length} and "
                         f"denoising_steps={steps} must be positive")
    call = ModelCall(model, block_size=block_length)
    clock = Stopwatch(call.device)
    b = _Blocks(call, as_batch(prompt_ids, call.device), gen_length, block_length, call.mask_id(mask_id))
    b.prefill()
    counts = get_num_transfer_tokens(block_length, steps)
    committed = 0
    for index in range(b.prefill_blocks, b.num_blocks):
        start = index * block_length
        block = b.x[:, start:start + block_length].clone()
        for step in range(steps + 1):
            mask_index = block == b.mask_id
            if not mask_index.any():
                b.store(block, start)
                break
            x0, x0_p = sample(b.denoise(block, start), temperature, top_k, top_p, filtered_confidence)
            transfer = _select(remasking_strategy, x0_p, mask_index, int(counts[step]), confidence_threshold)
            committed += int(transfer.sum())
            block[transfer] = x0[transfer]
        b.x[:, start:start + block_length] = block
        if stop_ids and bool(torch.isin(b.x[:, b.prompt_length:], torch.tensor(stop_ids, device=b.x.device)).any()):
            break
    return DecodeResult(b.x, b.prompt_length, DecodeStats(call.forwards, committed, clock.elapsed()))
