"""FP8 weights: checkpoints stored in FP8 (block-wise and per-channel scales) load as their
values, and ``--quantization fp8`` rounds a bf16 model's projections to FP8 at load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from optimus.models.errors import UnsupportedFormatError
from optimus.models.dense import dense_forward
from optimus.models.fp8 import E4M3_MAX, Fp8Linear, dequantize, quantize_rows
from optimus.models.loader import load_model
from fixtures.checkpoints import make_tiny_checkpoint

PROJ = "model.layers.0.self_attn.q_proj.weight"


def test_rows_round_to_e4m3_within_its_precision():
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 16)[:, None]
    q, scale = quantize_rows(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (16, 1)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((16,), E4M3_MAX))  # each row uses the full range
    back = dequantize(q, scale)
    assert ((back - w).abs() <= w.abs() / 16 + scale * 2 ** -9).all()  # 3 mantissa bits, subnormals near 0
    assert torch.equal(dequantize(*quantize_rows(back)), back)  # FP8 values are a fixed point


def _fp8_checkpoint(tmp_path, method: str, block: tuple[int, int] | None = None):
    """The tiny checkpoint's projections stored as FP8 in ``method``'s layout; returns (dir, expected values)."""
    root = make_tiny_checkpoint(tmp_path / method, "llama")
    tensors, expected = load_file(str(root / "model.safetensors")), {}
    for name in [n for n in tensors if n.endswith("_proj.weight")]:
        w = tensors[name].float()
        if block is None:  # one scale per output channel
            q, scale = quantize_rows(w)
            tensors[name + "_scale"] = scale
            tensors[name.replace(".weight", ".input_scale")] = torch.ones(1)  # static activation scale: unused
        else:
            bn, bk = block
            tiles = w.unfold(0, bn, bn).unfold(1, bk, bk)  # [N/bn, K/bk, bn, bk]
            scale = tiles.abs().amax(dim=(-1, -2)) / E4M3_MAX
            full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
            q = (w / full).to(torch.float8_e4m3fn)
            tensors[name + "_scale_inv"] = scale
        tensors[name] = q
        expected[name] = dequantize(q, tensors.get(name + "_scale", tensors.get(name + "_scale_inv")), block)
    save_file(tensors, str(root / "model.safetensors"))
    config = json.loads((root / "config.json").read_text())
    config["quantization_config"] = ({"quant_method": "fp8", "weight_block_size": list(block)} if block else
                                     {"quant_method": "compressed-tensors", "config_groups": {
                                         "group_0": {"weights": {"type": "float", "num_bits": 8}}}})
    (root / "config.json").write_text(json.dumps(config))
    return root, expected


@pytest.mark.parametrize("method,block", [("fp8", (16, 32)), ("compressed-tensors", None)])
def test_fp8_checkpoints_load_as_their_values(tmp_path, method, block):
    """Their projections stay FP8 with the stored bytes and scales, and compute exactly the
    dequantized values (merged q/k/v and gate/up included)."""
    root, expected = _fp8_checkpoint(tmp_path, method, block)
    model = load_model(root, dtype="float32", device="cpu", progress=False).model
    stored = load_file(str(root / "model.safetensors"))
    for name, values in expected.items():
        module = model.get_submodule(name.removesuffix(".weight"))
        assert isinstance(module, Fp8Linear) and module.block == block
        assert torch.equal(module.weight.view(torch.uint8), stored[name].view(torch.uint8))
        assert torch.equal(module.operand.dequantize(torch.float32), values)
    model.fuse_projections()
    assert all(layer.self_attn.merged_scale is not None for layer in model.model.layers)
    plain = load_model(make_tiny_checkpoint(tmp_path / "plain", "llama"), dtype="float32", device="cpu",
                       progress=False).model
    plain.load_state_dict({n: expected.get(n, t) for n, t in plain.state_dict().items()})
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        assert torch.equal(dense_forward(model, ids)[0], dense_forward(plain, ids)[0])


def test_other_quantized_checkpoints_are_refused_by_name(tmp_path):
    root = make_tiny_checkpoint(tmp_path / "gptq", "llama")
    config = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(UnsupportedFormatError, match="gptq"):
        load_model(root, device="cpu", progress=False)


def test_quantization_fp8_rounds_projections_only(tmp_path):
    root = make_tiny_checkpoint(tmp_path / "bf16", "llama")
    plain = dict(load_model(root, dtype="float32", device="cpu", progress=False).model.named_parameters())
    fp8 = dict(load_model(root, dtype="float32", device="cpu", progress=False,
                          quantization="fp8").model.named_parameters())
    q, scale = quantize_rows(plain[PROJ])
    assert fp8[PROJ].dtype == torch.float8_e4m3fn and torch.equal(fp8[PROJ].view(torch.uint8), q.view(torch.uint8))
    scales = dict(load_model(root, dtype="float32", device="cpu", progress=False,
                             quantization="fp8").model.named_buffers())
    assert torch.equal(scales[PROJ + "_scale"], scale.reshape(-1))
    assert not torch.equal(dequantize(q, scale), plain[PROJ])
    assert torch.equal(fp8["model.embed_tokens.weight"], plain["model.embed_tokens.weight"])


def test_an_fp8_engine_serves(tmp_path):
    from optimus.core.params import SamplingParams
    from optimus.engine.llm import LLM
    llm = LLM(str(make_tiny_checkpoint(tmp_path / "m", "sdar")), policy="fixed:4", device="cpu", quantization="fp8")
    assert len(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids) == 8
