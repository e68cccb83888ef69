"""FP8 (e4m3) weights: checkpoints stored in FP8, and ``--quantization fp8`` of bf16 ones.

Checkpoint formats read (config.json ``quantization_config``):

- ``quant_method: "fp8"`` (Hugging Face's fine-grained FP8, as DeepSeek-V3 and Qwen3-FP8 ship):
  an FP8 weight [N, K] beside ``<name>_scale_inv`` [ceil(N/bn), ceil(K/bk)] in fp32, one scale
  per ``weight_block_size`` [bn, bk] tile; without a block size, one scale per tensor;
- ``quant_method: "compressed-tensors"`` or ``"fbgemm_fp8"``: ``<name>_scale``, one per tensor
  ([] or [1]) or one per output channel ([N, 1]); activation scales (``input_scale``) are not
  used (activations stay bf16).

``--quantization fp8`` replaces each projection of a bf16 checkpoint at load by an
:class:`Fp8Linear`: e4m3 weights (one byte each: half the memory and half the bytes a
small-batch step streams) and one scale per output channel (``amax(|row|) / 448``), round to
nearest. On CUDA the FP8 linear kernel (kernels/fp8_linear.py) reads them as they are; on the
CPU they are dequantized per matmul, which gives the same values the model computes with.

FP8 checkpoints are read twice over: their values, dequantized to the load dtype, build the
model as any checkpoint does; their stored e4m3 weights and scales (per tensor, channel or
block) then replace each projection (:func:`keep_checkpoint_fp8`), so the model computes
exactly the published values with FP8 weights in memory. A tensor-parallel shard keeps the
dequantized values (its slices need not fall on block boundaries).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from optimus.kernels.fp8_linear import Fp8Weight, fp8_linear
from optimus.models.errors import LoadError, UnsupportedFormatError

E4M3_MAX = 448.0
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCALE_SUFFIXES = ("_scale_inv", "_scale")  # appended to the weight's name: weight_scale_inv, weight_scale
IGNORED_SUFFIXES = (".input_scale",)  # static activation scales: activations stay in the load dtype

TensorEntry = tuple[str, "str | None", tuple[int, ...], Callable[[], torch.Tensor]]


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (e4m3 [N, K], fp32 scales [N, 1]) with ``weight ~= q * scale`` per row."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)
    return (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None) -> torch.Tensor:
    """fp32 values of an FP8 weight [N, K]: ``scale`` is per tensor, per row [N, 1], or per
    ``block`` tile [ceil(N/bn), ceil(K/bk)]."""
    w, s = q.float(), scale.float()
    if s.numel() == 1:
        return w * s.reshape(())
    if block is not None and s.dim() == 2 and s.shape != (w.shape[0], 1):
        bn, bk = block
        s = s.repeat_interleave(bn, dim=0)[:w.shape[0]].repeat_interleave(bk, dim=1)[:, :w.shape[1]]
    if s.shape not in ((w.shape[0], 1), tuple(w.shape)):
        raise LoadError(f"FP8 scale of shape {tuple(scale.shape)} does not fit a weight of shape {tuple(q.shape)}")
    return w * s


class Fp8Linear(nn.Module):
    """A projection whose weight stays in FP8: ``weight`` e4m3 [N, K] and ``weight_scale``
    fp32, [N] per output channel or [ceil(N/bn), ceil(K/bk)] per ``block``; the bias stays in
    the load dtype. Layers multiply by :attr:`operand` through their ops."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 block: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.block = block
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        scale = scale.float()
        self.register_buffer("weight_scale", (scale.reshape(-1) if block is None else scale).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        q, scale = quantize_rows(linear.weight.detach())
        return cls(q, scale, linear.bias)

    @property
    def operand(self) -> Fp8Weight:
        return Fp8Weight(self.weight, self.weight_scale, self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.operand, self.bias)


def _replace_projections(model: nn.Module, make: Callable[[str, nn.Linear], "Fp8Linear | None"]) -> int:
    """Each projection Linear for which ``make(name, linear)`` gives an :class:`Fp8Linear`
    becomes it; merged q/k/v and gate/up buffers are dropped (``fuse_projections`` merges the
    FP8 ones). Returns how many were replaced."""
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS]
    count = 0
    for name, linear in targets:
        fp8 = make(name, linear)
        if fp8 is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, fp8)
            count += 1
    for m in model.modules():
        if hasattr(m, "merged_weight"):
            m.merged_weight = m.merged_bias = m.merged_scale = None
    return count


@torch.no_grad()
def quantize_model(model: nn.Module) -> int:
    """``--quantization fp8``: every projection Linear replaced by an :class:`Fp8Linear` of its
    weight (per output channel; under tensor parallelism, per row of this rank's slice).
    Run it last: a later ``model.to(dtype)`` would cast the e4m3 values without their scales.
    Returns the number of weights quantized (projections already in FP8 are kept as they are)."""
    return _replace_projections(model, lambda name, linear: Fp8Linear.from_linear(linear))


@torch.no_grad()
def keep_checkpoint_fp8(model: nn.Module, kept: dict[str, Fp8Weight]) -> int:
    """An FP8 checkpoint's projections back in FP8 with the checkpoint's own values and scales
    (``kept``: by weight name, what :func:`fp8_values` collected while the model loaded)."""
    def make(name: str, linear: nn.Linear) -> Fp8Linear | None:
        w = kept.pop(name + ".weight", None)
        if w is None:
            return None
        return Fp8Linear(w.data.to(linear.weight.device), w.scale.to(linear.weight.device), linear.bias, w.block)

    return _replace_projections(model, make)


@dataclass(frozen=True)
class FP8Checkpoint:
    """How a checkpoint's FP8 weights are scaled (from its ``quantization_config``)."""

    block: tuple[int, int] | None

    @classmethod
    def from_config(cls, config: dict) -> "FP8Checkpoint | None":
        qc = config.get("quantization_config")
        if not qc:
            return None
        method = str(qc.get("quant_method", "")).lower()
        if method == "fp8" or method == "fbgemm_fp8" or (method == "compressed-tensors" and _is_fp8(qc)):
            block = qc.get("weight_block_size")
            return cls(tuple(block) if block else None)
        raise UnsupportedFormatError(f"quantization_config quant_method={method!r} is not supported; this engine "
                                     "reads FP8 checkpoints (fp8, fbgemm_fp8, compressed-tensors float8) and "
                                     "unquantized ones")

    @staticmethod
    def is_scale(name: str) -> bool:
        return name.endswith(tuple(f".weight{s}" for s in SCALE_SUFFIXES)) or name.endswith(IGNORED_SUFFIXES)

    def dequantize_entries(self, entries: Iterator[TensorEntry], scales: dict[str, torch.Tensor],
                           keep: dict[str, Fp8Weight] | None = None) -> Iterator[TensorEntry]:
        """Skip the scale tensors; FP8 weights come out as fp32 values (``scales``: every
        ``*_scale``/``*_scale_inv`` tensor of the checkpoint, by name, read beforehand).
        ``keep``: also record each e4m3 weight as it is stored, by our weight name."""
        for source, ours, shape, read in entries:
            if self.is_scale(source):
                continue
            scale = next((scales[source + s] for s in SCALE_SUFFIXES if source + s in scales), None)
            if scale is not None:
                read = self._dequantized(source, ours, read, scale, keep)
            yield source, ours, shape, read

    def _dequantized(self, name: str, ours: str | None, read: Callable[[], torch.Tensor], scale: torch.Tensor,
                     keep: dict[str, Fp8Weight] | None):
        def values() -> torch.Tensor:
            q = read()
            if q.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
                raise LoadError(f"tensor {name!r} has a scale but dtype {q.dtype}, not FP8")
            scale_here = scale.to(q.device)
            kept = self._as_weight(q, scale_here) if keep is not None and ours is not None else None
            if kept is not None:
                keep[ours] = kept
            return dequantize(q, scale_here, self.block)
        return values

    def _as_weight(self, q: torch.Tensor, scale: torch.Tensor) -> Fp8Weight | None:
        """The stored weight in the kernel's layout, or None where it has none (e5m2 values,
        one scale per element)."""
        if q.dtype != torch.float8_e4m3fn or q.dim() != 2:
            return None
        n, k = q.shape
        s = scale.float()
        if s.numel() == 1:
            return Fp8Weight(q, s.reshape(1).expand(n).contiguous())
        if s.shape in ((n, 1), (n,)):
            return Fp8Weight(q, s.reshape(-1).contiguous())
        if self.block is not None and s.shape == (-(-n // self.block[0]), -(-k // self.block[1])):
            return Fp8Weight(q, s.contiguous(), tuple(self.block))
        return None


def fp8_values(config: dict, files: list[Path], entries: Iterator[TensorEntry], device: str,
               keep: dict[str, Fp8Weight] | None = None) -> Iterator[TensorEntry]:
    """A checkpoint's entries with FP8 weights as their values (scale tensors read first from
    ``files``, then skipped); the entries unchanged for a checkpoint that is not FP8. ``keep``
    collects the stored FP8 weights too (:func:`keep_checkpoint_fp8` puts them back)."""
    fp8 = FP8Checkpoint.from_config(config)
    if fp8 is None:
        return entries
    scales = {}
    for f in files:
        with safe_open(str(f), framework="pt", device=device) as handle:
            scales.update({n: handle.get_tensor(n) for n in handle.keys() if fp8.is_scale(n)})
    return fp8.dequantize_entries(entries, scales, keep)


def _is_fp8(qc: dict) -> bool:
    groups = qc.get("config_groups") or {}
    return any(str((g.get("weights") or {}).get("type", "")).lower() == "float" and
               int((g.get("weights") or {}).get("num_bits", 0)) == 8 for g in groups.values())
