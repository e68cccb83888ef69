"""Plain-torch references for the paged-KV kernels; also their CPU execution path.

Layout shared by every kernel in this package:
  k_cache, v_cache  [num_pages, page_size, Hkv, D]   one per layer
  slot              page_id * page_size + offset      (-1 = no slot)
A ragged step of R requests flattens its new tokens to T rows; request r owns rows
cu_q[r]:cu_q[r+1] and its cached prefix is positions 0..cache_lens[r]-1, read through
page_table[r]. Row i may attend to the whole cached prefix of its request and to the
request's new rows j with groups[j] <= groups[i] (groups nondecreasing per request).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def write_kv_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """Store rows k/v [T, Hkv, D] at slot_mapping [T] (rows with slot -1 are skipped). In place."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    page_size = k_cache.shape[1]
    pages, offsets = slots // page_size, slots % page_size
    k_cache[pages, offsets] = k[keep].to(k_cache.dtype)
    v_cache[pages, offsets] = v[keep].to(v_cache.dtype)


def gather_cache(cache: torch.Tensor, page_table: torch.Tensor, length: int) -> torch.Tensor:
    """cache [P, page_size, H, D], page_table [R, max_pages] -> [R, length, H, D].

    Positions past a request's own cache length read whatever page the table names (clamped
    to page 0 when the entry is negative); callers mask them out.
    """
    page_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    pages = page_table[:, pos // page_size].long().clamp_min(0)
    return cache[pages, (pos % page_size).expand_as(pages)]


def _pad_rows(x: torch.Tensor, req: torch.Tensor, local: torch.Tensor, num_req: int, width: int,
              fill: float | int = 0) -> torch.Tensor:
    """Scatter flat rows x [T, ...] into a padded [R, width, ...] tensor."""
    out = x.new_full((num_req, width, *x.shape[1:]), fill)
    out[req, local] = x
    return out


def group_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                              cache_lens: torch.Tensor, cu_q: torch.Tensor, groups: torch.Tensor,
                              scale: float | None = None, cache_only: bool = False) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D] in q's dtype; softmax in fp32.
    ``cache_only``: the new rows are not keys (see group_attention).

    Vectorised over requests by padding every request to the longest chunk and the longest
    cache of the step, then one masked SDPA call. Cost is R * max_q * (max_cache + max_q).
    Rows past ``cu_q[-1]`` (a CUDA graph's padding, owned by no request) come out as zeros.
    """
    t, hq, d = q.shape
    num_req = cu_q.numel() - 1
    if t == 0 or num_req == 0:
        return q.new_empty(t, hq, d)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dev, cu = q.device, cu_q.long()
    q_lens = cu[1:] - cu[:-1]
    max_q, max_c = int(q_lens.max()), int(cache_lens.max())
    rows = int(cu[-1])  # the requests' rows; padding follows
    req = torch.searchsorted(cu[1:], torch.arange(rows, device=dev), right=True)
    local = torch.arange(rows, device=dev) - cu[req]

    f32 = torch.float32
    qp = _pad_rows(q[:rows].to(f32), req, local, num_req, max_q)
    kp = _pad_rows(k[:rows].to(f32), req, local, num_req, max_q)
    vp = _pad_rows(v[:rows].to(f32), req, local, num_req, max_q)
    # Padded key rows get the largest group so no real query row can see them.
    big = torch.iinfo(torch.int32).max
    gp = _pad_rows(groups[:rows].to(torch.int64), req, local, num_req, max_q, fill=big)

    cache_ok = torch.arange(max_c, device=dev)[None, :] < cache_lens.long()[:, None]  # [R, C]
    # Zero the slots past each cache length: stale pages may hold NaN/inf, and a masked
    # score does not stop NaN from propagating through SDPA (NaN + -inf = NaN, 0 * NaN = NaN).
    live = cache_ok[:, :, None, None]
    kc = torch.where(live, gather_cache(k_cache, page_table, max_c).to(f32), 0.0)
    vc = torch.where(live, gather_cache(v_cache, page_table, max_c).to(f32), 0.0)
    new_ok = gp[:, None, :] <= gp[:, :, None]  # [R, Q(query), Q(key)]
    if cache_only:
        new_ok = torch.zeros_like(new_ok)
    mask = torch.cat([cache_ok[:, None, :].expand(-1, max_q, -1), new_ok], dim=2)

    keys = torch.cat([kc, kp], dim=1).transpose(1, 2)  # [R, Hkv, C+Q, D]
    vals = torch.cat([vc, vp], dim=1).transpose(1, 2)
    out = F.scaled_dot_product_attention(qp.transpose(1, 2), keys, vals, attn_mask=mask[:, None],
                                         scale=scale, enable_gqa=hq != keys.shape[1])
    out = out.transpose(1, 2)[req, local].to(q.dtype)
    return out if rows == t else torch.cat([out, out.new_zeros(t - rows, hq, d)])


# ---- fused decoder-layer elementwise ops (see fused.py). Each states the numerics its Triton
# kernel reproduces: fp32 arithmetic, rounded to the storage dtype exactly where the HF
# Llama/Qwen torch code rounds.

def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, d] (+ residual [T, d]) -> (weight * rmsnorm(h), h) with h = x + residual, or x.

    h is rounded to its dtype before the norm (as ``x = x + block(x)`` is in torch); the
    normalised row is computed in fp32 and cast back to h's dtype before the weight.
    """
    h = x if residual is None else residual + x
    h32 = h.float()
    normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(h.dtype), h


def rotary_qk_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                        inv_freq: torch.Tensor, q_norm: torch.Tensor | None = None,
                        k_norm: torch.Tensor | None = None, eps: float = 1e-6,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D], positions [T], inv_freq [D/2] fp32 -> rotated (q, k).

    Half-split rotary with angles ``positions.float() * inv_freq`` and the rotation done in
    fp32, rounded once to the input dtype. With ``q_norm``/``k_norm`` ([D] weights) each head
    row is first RMS-normalised (Qwen3's q/k norm) and rounded like ``rms_norm_reference``.
    """
    angles = positions.float()[:, None] * inv_freq.float()[None, :]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]

    def rotate(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        if weight is not None:
            x = rms_norm_reference(x, weight, eps)[0].to(x.dtype)
        x1, x2 = x.float().chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype)

    return rotate(q, q_norm), rotate(k, k_norm)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate first) -> silu(gate) * up [T, I]; each op rounded to the dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def fused_moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                        ids: torch.Tensor) -> torch.Tensor:
    """Sparse MLP: out[t] = sum_j weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = ids[t, j].

    x [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; weights [T, k] (any
    float dtype); ids [T, k] int, in [0, E]: E marks a pair whose expert is not here (another
    rank's, under expert parallelism), which adds nothing. Token-expert pairs are grouped by
    expert and each touched expert runs once on its rows (its counts are read on the host: not
    for CUDA graphs). The expert MLP rounds to x's dtype after each matmul like nn.Linear; the
    weighted sum is fp32.
    """
    t, k = ids.shape
    inner = w2.shape[2]
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0] + 1).tolist()[:w13.shape[0]]
    pair_w = weights.reshape(-1).float()
    out = torch.zeros(t * k, x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        rows = order[start:start + n]
        gate_up = F.linear(x[rows // k], w13[expert])
        y = F.linear(F.silu(gate_up[:, :inner]) * gate_up[:, inner:], w2[expert])
        out[rows] = y.float() * pair_w[rows, None]
        start += n
    return out.view(t, k, -1).sum(1).to(x.dtype)


def top_k_stable(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries per row; ties go to the lower index (a stable sort),
    so a routing decision never depends on the device's topk implementation."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def group_limit(choice: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """Keep the experts of the ``topk_group`` best groups (a group scores the sum of its two
    best entries, LLaDA2.0's rule), the rest become -inf. choice [T, E] fp32."""
    t, e = choice.shape
    grouped = choice.view(t, n_group, e // n_group)
    group_scores = grouped.topk(min(2, e // n_group), dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, top_k_stable(group_scores, topk_group), True)
    return grouped.masked_fill(~keep[:, :, None], float("-inf")).view(t, e)


def moe_route_reference(logits: torch.Tensor, bias: torch.Tensor | None, routing) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (combine weights [T, k] fp32, expert ids [T, k] int64) under
    ``routing`` (kernels.moe_route.MoeRouting). The bias (sigmoid routing) only shifts which
    experts are chosen; the weights are the unbiased scores of the chosen experts."""
    logits = logits.float()
    scores = logits.softmax(-1) if routing.softmax else logits.sigmoid()
    choice = scores if bias is None else scores + bias.float()
    if routing.n_group > 1:
        choice = group_limit(choice, routing.n_group, routing.topk_group)
    ids = top_k_stable(choice, routing.top_k)
    weights = scores.gather(1, ids)
    if routing.norm_topk and routing.top_k > 1:
        eps = 0.0 if routing.softmax else 1e-20
        weights = weights / (weights.sum(-1, keepdim=True) + eps)
    return weights * routing.scaling, ids
