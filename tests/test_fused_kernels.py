"""Fused layer kernels (rms_norm, rotary_qk, silu_mul): references vs the HF torch ops, Triton vs
references, the fused decoder path vs the torch path, and merged q/k/v and gate/up projections."""

from __future__ import annotations

import math

import pytest
import torch

from optimus import toggles

from optimus.kernels import fused
from optimus.kernels.reference import rms_norm_reference, rotary_qk_reference, silu_mul_reference
from optimus.models.dense import dense_forward
from optimus.models.layers import FusedOps, RMSNorm, RotaryEmbedding, TorchOps, apply_rotary, layer_ops
from fixtures import make_tiny_model

# Triton vs reference: fp32 op order only; half precision: at most a rounding step apart.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _rand(*shape, seed: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


@pytest.fixture(scope="module")
def device(triton_device) -> str:
    return triton_device


# ---- references against the torch ops the model has always used


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_reference_is_the_module_numerics(dtype) -> None:
    norm = RMSNorm(24, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(_rand(24, seed=1, scale=0.3) + 1)
    norm = norm.to(dtype)
    x, r = _rand(5, 24, seed=2, dtype=dtype), _rand(5, 24, seed=3, dtype=dtype)
    y, h = rms_norm_reference(x, norm.weight, 1e-5)
    assert h is x and torch.equal(y, norm(x))
    y, h = rms_norm_reference(x, norm.weight, 1e-5, residual=r)
    assert torch.equal(h, r + x) and torch.equal(y, norm(r + x))


def test_rotary_reference_matches_hf_rotation_and_is_relative() -> None:
    rope = RotaryEmbedding(16, 10000.0)
    q, k = _rand(6, 3, 16, seed=4), _rand(6, 1, 16, seed=5)
    pos = torch.tensor([0, 1, 5, 17, 300, 2047])
    rq, rk = rotary_qk_reference(q, k, pos, rope.inv_freq)
    cos, sin = rope.cos_sin(pos, torch.float32)
    torch.testing.assert_close(rq, apply_rotary(q, cos, sin), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rk, apply_rotary(k, cos, sin), atol=1e-6, rtol=1e-6)
    # Scores depend on relative positions only: shifting every position keeps q.k (up to the
    # fp32 rounding of angles ~2e3 rad, ~1e-4).
    sq, sk = rotary_qk_reference(q.double(), k.double(), pos + 123, rope.inv_freq)
    dq, dk = rotary_qk_reference(q.double(), k.double(), pos, rope.inv_freq)
    torch.testing.assert_close(sq[:, 0] @ sk[:, 0].T, dq[:, 0] @ dk[:, 0].T, atol=5e-4, rtol=0)
    assert not torch.allclose(rq, q, atol=1e-3)  # positions > 0 do rotate


def test_rotary_reference_q_k_norm_is_rms_norm_per_head() -> None:
    q, k = _rand(3, 2, 8, seed=6), _rand(3, 2, 8, seed=7)
    qw, kw = _rand(8, seed=8) + 1, _rand(8, seed=9) + 1
    zero = torch.zeros(3, dtype=torch.long)  # angle 0: rotation is the identity
    rq, rk = rotary_qk_reference(q, k, zero, torch.ones(4), qw, kw, eps=1e-6)
    torch.testing.assert_close(rq, q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * qw)
    torch.testing.assert_close(rk, k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * kw)


def test_silu_mul_reference_is_gate_silu_times_up() -> None:
    gu = _rand(4, 10, seed=10).double()
    g, u = gu[:, :5], gu[:, 5:]
    torch.testing.assert_close(silu_mul_reference(gu), g / (1 + torch.exp(-g)) * u)


# ---- Triton kernels vs references


@pytest.mark.parametrize("dtype,width", [(torch.float32, 48), (torch.float16, 40), (torch.bfloat16, 64)])
def test_rms_norm_triton_matches_reference(device, dtype, width) -> None:
    x = _rand(7, width, seed=11, dtype=dtype).to(device)
    r = _rand(7, width, seed=12, dtype=dtype).to(device)
    w = (_rand(width, seed=13, scale=0.2) + 1).to(dtype).to(device)
    for residual in (None, r):
        got_y, got_h = fused.rms_norm(x, w, 1e-6, residual, backend="triton")
        want_y, want_h = rms_norm_reference(x, w, 1e-6, residual)
        assert got_y.dtype == want_y.dtype and got_h.dtype == want_h.dtype
        torch.testing.assert_close(got_y.float(), want_y.float(), atol=TOL[dtype], rtol=TOL[dtype])
        # The residual sum is one rounding of the same fp32 sum (the CPU interpreter rounds
        # bf16 differently from CUDA, hence the bf16 tolerance).
        exact = dtype != torch.bfloat16 or device == "cuda"
        tol = 0.0 if exact else TOL[dtype]
        torch.testing.assert_close(got_h.float(), want_h.float(), atol=tol, rtol=tol)


def test_rms_norm_triton_strided_rows_and_empty(device) -> None:
    base = _rand(5, 96, seed=14).to(device)
    x = base[:, 16:64]  # row stride 96
    w = (_rand(48, seed=15) + 1).to(device)
    got, _ = fused.rms_norm(x, w, 1e-5, backend="triton")
    torch.testing.assert_close(got, rms_norm_reference(x, w, 1e-5)[0], atol=2e-5, rtol=2e-5)
    y, h = fused.rms_norm(x[:0], w, 1e-5, x[:0], backend="triton")
    assert y.shape == (0, 48) and h.shape == (0, 48)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rotary_triton_matches_reference(device, dtype, qk_norm) -> None:
    # q/k/v as column views of one merged projection output (row stride > Hq*D), GQA 6/2,
    # head dim 24 (half 12: not a power of two), positions up to 50k.
    t, hq, hk, d = 5, 6, 2, 24
    qkv = _rand(t, (hq + 2 * hk) * d, seed=16, dtype=dtype).to(device)
    q = qkv[:, :hq * d].view(t, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
    pos = torch.tensor([0, 3, 4095, 31999, 50000], device=device)
    inv = RotaryEmbedding(d, 1e6).inv_freq.to(device)
    norm = None
    if qk_norm:
        norm = fused.QKNorm((_rand(d, seed=17, scale=0.2) + 1).to(dtype).to(device),
                            (_rand(d, seed=18, scale=0.2) + 1).to(dtype).to(device), 1e-6)
    got_q, got_k = fused.rotary_qk(q, k, pos, inv, norm, backend="triton")
    want_q, want_k = fused.rotary_qk(q, k, pos, inv, norm, backend="torch")
    assert got_q.shape == q.shape and got_k.shape == k.shape and got_q.dtype == dtype
    torch.testing.assert_close(got_q.float(), want_q.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(got_k.float(), want_k.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype,inner", [(torch.float32, 40), (torch.float16, 1500)])
def test_silu_mul_triton_matches_reference(device, dtype, inner) -> None:
    gu = _rand(3, 2 * inner, seed=19, dtype=dtype, scale=3.0).to(device)
    got = fused.silu_mul(gu, backend="triton")
    torch.testing.assert_close(got.float(), silu_mul_reference(gu).float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_fused_api_rejects_bad_shapes() -> None:
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="weight"):
        fused.rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused.rms_norm(x, torch.ones(8), 1e-6, residual=torch.zeros(3, 8))
    with pytest.raises(ValueError, match="inv_freq"):
        fused.rotary_qk(torch.zeros(2, 2, 8), torch.zeros(2, 1, 8), torch.zeros(2, dtype=torch.long),
                        torch.ones(3))
    with pytest.raises(ValueError, match="positions"):
        fused.rotary_qk(torch.zeros(2, 2, 8), torch.zeros(2, 1, 8), torch.zeros(2), torch.ones(4))
    with pytest.raises(ValueError, match="2I"):
        fused.silu_mul(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="backend"):
        fused.silu_mul(torch.zeros(2, 8), backend="cuda-magic")


# ---- the decoder: op selection, fused path, merged projections


def test_layer_ops_selection() -> None:
    rope = RotaryEmbedding(8, 1e4)
    x, pos = torch.zeros(3, 16), torch.arange(3)
    with torch.no_grad():
        assert isinstance(layer_ops("auto", x, pos, rope), TorchOps)  # CPU tensors
        assert isinstance(layer_ops("triton", x, pos, rope), FusedOps)
        assert isinstance(layer_ops("torch", x, pos, rope), TorchOps)
    with pytest.raises(ValueError, match="kernel mode"):
        layer_ops("fast", x, pos, rope)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return dense_forward(model, ids)[0]


@pytest.mark.parametrize("family", ["sdar", "dream"])  # q/k norm; qkv bias
def test_fused_decoder_path_matches_torch_path(device, family) -> None:
    model, spec = make_tiny_model(family, seed=3)
    model = model.to(device)
    ids = torch.randint(0, spec.arch.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4)).to(device)
    with toggles.override(model_kernels="torch"):
        want = _logits(model, ids)
    with toggles.override(model_kernels="triton"):
        unmerged = _logits(model, ids)
        model.fuse_projections()
        merged = _logits(model, ids)
    # Logits are O(5) here; the fused path differs from torch by fp32 op order only.
    for got in (unmerged, merged):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    assert want.std() > 1.0  # the comparison is not between near-constant logits


def test_fused_half_precision_is_as_accurate_as_torch_path(device) -> None:
    """In fp16 the fused path rounds where torch rounds (fp16: the CPU interpreter rounds to
    nearest like CUDA; its bf16 casts truncate, so bf16 is left to optimus.bench.experiments.fused_check)."""
    model, spec = make_tiny_model("sdar", seed=11)
    model = model.to(device)
    ids = torch.randint(0, spec.arch.vocab_size, (2, 6), generator=torch.Generator().manual_seed(12)).to(device)
    with toggles.override(model_kernels="torch"):
        truth = _logits(model, ids)
    model.half()
    errors = {}
    for mode in ("torch", "triton"):
        with toggles.override(model_kernels=mode):
            errors[mode] = float((_logits(model, ids).float() - truth).norm() / truth.norm())
    assert 0 < errors["triton"] <= 1.25 * errors["torch"], errors


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "sdar", "dream", "llada"])
def test_merged_projections_keep_logits_and_state_dict_exactly(family) -> None:
    model, spec = make_tiny_model(family, seed=5)
    ids = torch.randint(0, spec.arch.vocab_size, (2, 7), generator=torch.Generator().manual_seed(6))
    before = _logits(model, ids)
    state = {n: t.clone() for n, t in model.state_dict().items()}
    model.fuse_projections()
    assert torch.equal(_logits(model, ids), before)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[n], state[n]) for n in state)
    attn = model.model.layers[0].self_attn
    assert attn.merged_weight is not None and attn._merged_intact()
    # Parameters are views of the merged buffer: no second copy of the weights.
    assert attn.q_proj.weight.data_ptr() == attn.merged_weight.data_ptr()
    mlp = model.model.layers[-1].mlp
    assert mlp.up_proj.weight.data_ptr() == mlp.merged_weight.data_ptr() + mlp.gate_proj.weight.numel() * 4


def test_merged_projections_follow_loads_and_dtype_moves() -> None:
    model, spec = make_tiny_model("dream", seed=7)  # q/k/v biases are merged too
    other, _ = make_tiny_model("dream", seed=8)
    ids = torch.randint(0, spec.arch.vocab_size, (1, 5), generator=torch.Generator().manual_seed(9))
    want_other = _logits(other, ids)
    model.fuse_projections()
    model.load_state_dict(other.state_dict())  # in-place copies land in the merged buffers
    assert model.model.layers[0].self_attn._merged_intact()
    assert torch.equal(_logits(model, ids), want_other)

    model.to(torch.float64)  # re-allocates every parameter: they are aliased again
    attn = model.model.layers[0].self_attn
    assert attn.merged_weight.dtype == torch.float64 and attn._merged_intact()
    torch.testing.assert_close(_logits(model, ids).float(), want_other, atol=1e-4, rtol=1e-4)

    fresh, _ = make_tiny_model("dream", seed=10)
    model.to(torch.float32).load_state_dict(fresh.state_dict(), assign=True)  # replaces params
    assert torch.equal(_logits(model, ids), _logits(fresh, ids))  # separate Linears run then
    assert attn.merged_weight is None


def test_merged_projections_still_train() -> None:
    """Under autograd the Linears (views of the merged buffer) run, so they get gradients."""
    model, spec = make_tiny_model("qwen2", seed=12)
    model.fuse_projections()
    ids = torch.randint(0, spec.arch.vocab_size, (1, 5), generator=torch.Generator().manual_seed(13))
    dense_forward(model, ids)[0].square().mean().backward()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    for p in (attn.q_proj.weight, attn.v_proj.bias, mlp.gate_proj.weight, mlp.up_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_fused_kernels_only_without_autograd(device) -> None:
    if device != "cuda":
        pytest.skip("auto picks the kernels on CUDA only")
    rope = RotaryEmbedding(8, 1e4).to(device)
    x, pos = torch.zeros(3, 16, device=device), torch.arange(3, device=device)
    with torch.no_grad():
        assert isinstance(layer_ops("auto", x, pos, rope), FusedOps)
    assert isinstance(layer_ops("auto", x, pos, rope), TorchOps)  # training keeps autograd


def test_rotary_angle_reduction_constants() -> None:
    triton_mod = pytest.importorskip("optimus.kernels._fused_triton")
    hi, mid, lo = (float(c.value) for c in (triton_mod._TWO_PI_HI, triton_mod._TWO_PI_MID,
                                            triton_mod._TWO_PI_LO))
    assert abs(hi + mid + lo - 2 * math.pi) < 1e-15
    # Few mantissa bits: n * hi exact for |n| < 2^16, n * mid for |n| < 2^13 (in fp32).
    assert (hi * 2**5).is_integer() and hi * 2**5 < 2**8
    assert (mid * 2**20).is_integer() and mid * 2**20 < 2**11


def test_every_exported_name_exists() -> None:
    """layer_ops calls fused.triton_available() on CUDA only; a missing export must fail here,
    on CPU, not first on the GPU."""
    from optimus.kernels import fused

    missing = [name for name in fused.__all__ if not hasattr(fused, name)]
    assert not missing, f"optimus.kernels.fused.__all__ names missing attributes: {missing}"
