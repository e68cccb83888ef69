"""Linear layers for steps of few rows (batch-1 decoding): y = x @ W^T + b.

At <= 16 rows a linear reads W once and does almost no arithmetic, so its time is the
weight stream. cuBLAS picks split-K GEMV kernels that reach 1.6-2.8 TB/s of the H100's
3.35 TB/s on the Llama-8B projections (docs/gpu.md); the Triton kernel streams W with a
deep load pipeline instead and needs no split-K reduction kernel. Backends: "torch"
(F.linear, the reference and the CPU path), "triton" (CUDA, or CPU under TRITON_INTERPRET=1),
"auto" (triton on CUDA when Triton imports). Larger inputs always go to F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from optimus import toggles
from optimus.kernels.group_attention import resolve_backend

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           backend: str = "auto") -> torch.Tensor:
    """x [M, K], weight [N, K], bias [N] or None -> [M, N] in x's dtype (fp32 accumulation)."""
    if not _kernel_applies(x, weight, bias) or resolve_backend(backend, x) == "torch":
        return F.linear(x, weight, bias)
    from optimus.kernels._skinny_linear_triton import skinny_linear_triton

    x = x if x.stride(-1) == 1 else x.contiguous()
    return skinny_linear_triton(x, weight, bias)


def _kernel_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (x.dim() == 2 and x.shape[0] <= toggles.active().skinny_max_rows and weight.dim() == 2
            and x.shape[1] == weight.shape[1] and weight.is_contiguous()
            and x.dtype == weight.dtype and x.dtype in _DTYPES
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))
