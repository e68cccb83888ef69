"""LLaDA2.0 (LLaDA2MoeModelLM) forward in plain torch, written from the published modeling
file's description and reading the checkpoint's own tensor names: no optimus code.

Per layer: x += dense(attn(rope_partial(qk_norm(split(query_key_value(rms(x))))))); then
x += mlp(rms(x)) where mlp is a dense SwiGLU on the first ``first_k_dense_replace`` layers
and otherwise sum_j w_j expert_j(x) + shared_expert(x): experts chosen by sigmoid(gate(x)) +
expert_bias among the ``topk_group`` of ``n_group`` groups with the best top-2 sums; w_j are
the chosen sigmoid scores (no bias) renormalised, times ``routed_scaling_factor``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def swiglu(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    g, u, d = (sd[f"{prefix}.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj"))
    return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)


def choose_experts(scores: torch.Tensor, bias: torch.Tensor, cfg: dict) -> list[list[int]]:
    """Per token, the chosen expert ids, one token at a time (ties: lower index first)."""
    e, groups = scores.shape[1], cfg["n_group"]
    size = e // groups
    chosen = []
    for row in (scores + bias):
        group_score = [sorted(row[g * size:(g + 1) * size].tolist(), reverse=True)[:2] for g in range(groups)]
        ranked_groups = sorted(range(groups), key=lambda g: (-sum(group_score[g]), g))[:cfg["topk_group"]]
        allowed = [i for g in ranked_groups for i in range(g * size, (g + 1) * size)]
        chosen.append(sorted(allowed, key=lambda i: (-row[i].item(), i))[:cfg["num_experts_per_tok"]])
    return chosen


def sparse_mlp(x: torch.Tensor, sd: dict, prefix: str, cfg: dict) -> torch.Tensor:
    scores = torch.sigmoid(F.linear(x.float(), sd[f"{prefix}.gate.weight"].float()))
    out = torch.zeros_like(x, dtype=torch.float32)
    for t, experts in enumerate(choose_experts(scores, sd[f"{prefix}.gate.expert_bias"].float(), cfg)):
        w = scores[t, experts]
        w = w / (w.sum() + 1e-20) * cfg["routed_scaling_factor"]
        for j, e in enumerate(experts):
            out[t] += w[j] * swiglu(x[t:t + 1], sd, f"{prefix}.experts.{e}")[0].float()
    return out.to(x.dtype) + swiglu(x, sd, f"{prefix}.shared_experts")


def rope_partial(x: torch.Tensor, pos: torch.Tensor, rot: int, theta: float) -> torch.Tensor:
    """x [B, H, L, D]: rotate-half rotary on dims [0, rot), the rest unchanged."""
    inv = 1.0 / theta ** (torch.arange(0, rot, 2).float() / rot)
    ang = pos.float()[:, None, :, None] * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    xr = x[..., :rot]
    half = torch.cat([-xr[..., rot // 2:], xr[..., :rot // 2]], -1)
    return torch.cat([xr * cos.to(x.dtype) + half * sin.to(x.dtype), x[..., rot:]], -1)


def llada2_logits(sd: dict, cfg: dict, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ids, pos [B, L]; mask [B, L, L] bool (True = may attend) -> logits [B, L, V]."""
    b, l = ids.shape
    hq, hkv, d, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
    rot = int(d * cfg["partial_rotary_factor"])
    x = sd["model.word_embeddings.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        h = rms(x, sd[f"{p}.input_layernorm.weight"], eps)
        qkv = F.linear(h, sd[f"{p}.attention.query_key_value.weight"]).view(b, l, hq + 2 * hkv, d).transpose(1, 2)
        q, k, v = qkv.split([hq, hkv, hkv], dim=1)
        q = rope_partial(rms(q, sd[f"{p}.attention.query_layernorm.weight"], eps), pos, rot, cfg["rope_theta"])
        k = rope_partial(rms(k, sd[f"{p}.attention.key_layernorm.weight"], eps), pos, rot, cfg["rope_theta"])
        k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        att = (q @ k.transpose(-1, -2)) / d ** 0.5
        att = att.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
        x = x + F.linear((att @ v).transpose(1, 2).reshape(b, l, hq * d), sd[f"{p}.attention.dense.weight"])
        h = rms(x, sd[f"{p}.post_attention_layernorm.weight"], eps)
        if i < cfg["first_k_dense_replace"]:
            x = x + swiglu(h, sd, f"{p}.mlp")
        else:
            x = x + sparse_mlp(h.reshape(b * l, -1), sd, f"{p}.mlp", cfg).view(b, l, -1)
    return F.linear(rms(x, sd["model.norm.weight"], eps), sd["lm_head.weight"])
