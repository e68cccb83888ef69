"""Autoregressive decoding for causal LMs: the baseline dLLM serving is compared against.

Greedy at temperature 0 (argmax, first index on ties), otherwise multinomial sampling from
``softmax(logits / T)`` after optional top-k / top-p filtering. With ``use_cache`` the prompt
is prefilled once and each new token runs alone against the cache; without it every step
reruns the whole sequence (the two agree: causal attention never lets a token see later ones).
Stops after ``max_new_tokens`` or on a stop id (which is kept in the output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from optimus.models.dense import CacheMode
from optimus.models.spec import AttentionKind
from optimus.models.transformer import DecoderLM
from optimus.reference.adapter import ModelCall, as_batch
from optimus.reference.sdar import top_k_logits, top_p_logits
from optimus.reference.stats import DecodeResult, DecodeStats, Stopwatch


def next_token(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [B, V] of the last position -> token ids [B]."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    scaled = logits.float() / temperature
    if top_k > 0:
        scaled = top_k_logits(scaled, top_k)
    if top_p < 1.0:
        scaled = top_p_logits(scaled, top_p)
    return torch.multinomial(F.softmax(scaled, dim=-1), num_samples=1).squeeze(-1)


@torch.no_grad()
def generate(model: DecoderLM, prompt_ids, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop_ids: tuple[int, ...] = (),
             use_cache: bool = True) -> DecodeResult:
    if model.spec.attention is not AttentionKind.CAUSAL:
        raise ValueError(f"autoregressive decoding needs a causal LM; {model.spec.family!r} uses "
                         f"{model.spec.attention.value} attention")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be positive")
    call = ModelCall(model)
    seq = as_batch(prompt_ids, call.device)
    if seq.shape[0] != 1:
        raise ValueError("the AR reference decodes one request at a time")
    clock = Stopwatch(call.device)
    prompt_length, cache = seq.shape[1], None
    for _ in range(max_new_tokens):
        if use_cache:
            fresh = seq if cache is None else seq[:, -1:]
            logits, cache = call(fresh, seq.shape[1] - fresh.shape[1], cache, CacheMode.APPEND)
        else:
            logits, _ = call(seq)
        token = next_token(logits[:, -1], temperature, top_k, top_p)
        seq = torch.cat([seq, token[:, None]], dim=1)
        if int(token) in stop_ids:
            break
    generated = seq.shape[1] - prompt_length
    return DecodeResult(seq, prompt_length, DecodeStats(call.forwards, generated, clock.elapsed()))
