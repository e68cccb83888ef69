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

from optimus.kernels.group_attention import resolve_backend

MAX_ROWS = 16  # one tl.dot tile of rows; above this the matmul is no longer a weight stream
FUSE_SILU = True  # silu_mul_linear forms its input in the kernel (an A/B switch, like MAX_ROWS)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           backend: str = "auto") -> torch.Tensor:
    """x [M, K], weight [N, K], bias [N] or None -> [M, N] in x's dtype (fp32 accumulation)."""
    if not _kernel_applies(x, weight, bias) or resolve_backend(backend, x) == "torch":
        return F.linear(x, weight, bias)
    from optimus.kernels._skinny_linear_triton import skinny_linear_triton

    x = x if x.stride(-1) == 1 else x.contiguous()
    return skinny_linear_triton(x, weight, bias)


def silu_mul_linear_applies(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor,
                            backend: str = "auto") -> bool:
    """Whether ``silu_mul_linear`` runs as one kernel: gate and up [M, K] share a layout
    (two halves of one gate_up matmul) and the skinny kernel applies to them."""
    return (FUSE_SILU and up.shape == gate.shape and up.dtype == gate.dtype
            and up.stride() == gate.stride() and gate.stride(-1) == 1
            and _kernel_applies(gate, weight, None) and resolve_backend(backend, gate) == "triton")


def silu_mul_linear(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor,
                    backend: str = "auto") -> torch.Tensor:
    """(silu(gate) * up) @ weight^T -> [M, N], silu rounded to the dtype before the product
    (torch's rounding). One kernel when ``silu_mul_linear_applies``, else two ops."""
    if not silu_mul_linear_applies(gate, up, weight, backend):
        return linear(torch.nn.functional.silu(gate) * up, weight, None, backend)
    from optimus.kernels._skinny_linear_triton import skinny_linear_triton

    return skinny_linear_triton(gate, weight, None, up=up)


def _kernel_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (x.dim() == 2 and x.shape[0] <= MAX_ROWS and weight.dim() == 2
            and x.shape[1] == weight.shape[1] and weight.is_contiguous()
            and x.dtype == weight.dtype and x.dtype in _DTYPES
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))
