"""The MoE families: SDAR-MoE against transformers' Qwen3MoeForCausalLM (block-causal mask),
LLaDA2.0 against a plain-torch reference of its published modeling code, hand-checked routing
cases, and the config fields each family reads."""

from __future__ import annotations

import pytest
import torch

from optimus.models.dense import attention_mask, dense_forward
from optimus.models.loader import load_model
from optimus.models.moe import route
from optimus.models.registry import spec_from_config
from optimus.models.spec import AttentionKind, MoEConfig

from fixtures.checkpoints import checkpoint_tensors, make_tiny_checkpoint, make_tiny_model, tiny_config
from llada2_reference import llada2_logits

ATOL = 1e-4


def _block_mask(spec, pos):
    return attention_mask(spec.attention, pos, pos, spec.block_size)


def test_sdar_moe_matches_transformers_qwen3_moe():
    transformers = pytest.importorskip("transformers")
    from test_parity import hf_logits

    model, spec = make_tiny_model("sdar_moe")
    cfg = tiny_config("sdar_moe")
    hf_cfg = transformers.Qwen3MoeConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "eager"
    hf = transformers.Qwen3MoeForCausalLM(hf_cfg).eval()
    state = model.state_dict()
    for i in spec.arch.moe.layers:  # transformers 5 stacks experts: gate_up_proj [E, 2I, H], down_proj [E, H, I]
        p = f"model.layers.{i}.mlp.experts"
        e = range(spec.arch.moe.num_experts)
        state[f"{p}.gate_up_proj"] = torch.stack([torch.cat([state.pop(f"{p}.{j}.gate_proj.weight"),
                                                             state.pop(f"{p}.{j}.up_proj.weight")]) for j in e])
        state[f"{p}.down_proj"] = torch.stack([state.pop(f"{p}.{j}.down_proj.weight") for j in e])
    hf.load_state_dict(state, strict=True)
    ids = torch.randint(0, 320, (2, 11))
    pos = torch.arange(11).expand(2, 11)
    mask = _block_mask(spec, pos)
    ours, _ = dense_forward(model, ids, pos, mask)
    ref = hf_logits(hf, ids, pos, mask)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert ref.std() > 0.1
    assert spec.attention is AttentionKind.BLOCK_CAUSAL and spec.arch.moe.layers == (0, 2)


def test_llada2_matches_reference():
    model, spec = make_tiny_model("llada2_moe")
    cfg = tiny_config("llada2_moe")
    sd = checkpoint_tensors("llada2_moe", model)
    assert "model.word_embeddings.weight" in sd and "model.layers.1.mlp.gate.expert_bias" in sd
    ids = torch.randint(0, 320, (2, 13))
    pos = torch.arange(13).expand(2, 13)
    mask = _block_mask(spec, pos)
    ours, _ = dense_forward(model, ids, pos, mask)
    with torch.no_grad():
        ref = llada2_logits(sd, cfg, ids, pos, mask)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert ref.std() > 0.1


@pytest.mark.parametrize("family", ["sdar_moe", "llada2_moe"])
def test_checkpoint_round_trip(family, tmp_path):
    """Sharded checkpoint on disk under the real tensor names -> loader -> same logits."""
    model, spec = make_tiny_model(family, seed=3)
    loaded = load_model(make_tiny_checkpoint(tmp_path, family, shards=2, seed=3), device="cpu", progress=False)
    assert loaded.spec.family == family and loaded.spec.arch.moe == spec.arch.moe
    ids = torch.randint(0, 320, (1, 9))
    pos = torch.arange(9)[None]
    a, _ = dense_forward(model, ids, pos, _block_mask(spec, pos))
    b, _ = dense_forward(loaded.model, ids, pos, _block_mask(spec, pos))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_llada2_published_config_fields():
    """LLaDA2.0-mini's config.json (no mask id or block in it): the spec the registry builds."""
    cfg = {"architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "hidden_size": 2048,
           "intermediate_size": 5120, "num_hidden_layers": 20, "num_attention_heads": 16,
           "num_key_value_heads": 4, "head_dim": 128, "partial_rotary_factor": 0.5, "rope_theta": 600000,
           "rms_norm_eps": 1e-6, "use_qk_norm": True, "use_qkv_bias": False, "num_experts": 256,
           "num_experts_per_tok": 8, "num_shared_experts": 1, "moe_intermediate_size": 512, "n_group": 8,
           "topk_group": 4, "routed_scaling_factor": 2.5, "score_function": "sigmoid", "norm_topk_prob": True,
           "first_k_dense_replace": 1, "vocab_size": 157184, "pad_token_id": 156892, "max_position_embeddings": 32768,
           "tie_word_embeddings": False}
    spec = spec_from_config(cfg)
    assert (spec.family, spec.mask_id, spec.block_size, spec.attention) == \
        ("llada2_moe", 156895, 32, AttentionKind.BLOCK_CAUSAL)
    assert spec.arch.rope_dim == 64 and spec.arch.moe.layers == tuple(range(1, 20))
    assert spec.arch.moe.shared_size == 512 and spec.arch.moe.scaling == 2.5
    by_arch = spec_from_config({k: v for k, v in cfg.items() if k != "model_type"})
    assert by_arch.family == "llada2_moe"  # not the dense "llada" its architecture name contains


def test_qwen3_moe_sparse_layers_follow_step_and_dense_list():
    cfg = tiny_config("sdar_moe", num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    assert spec_from_config(cfg).arch.moe.layers == (1, 5)


# ------------------------------------------------------------------ routing by hand

def _cfg(**kw) -> MoEConfig:
    base = dict(num_experts=4, top_k=2, expert_size=8, layers=(0,))
    return MoEConfig(**{**base, **kw})


def test_softmax_routing_renormalises_the_chosen():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    w, ids = route(logits, _cfg())
    assert ids.tolist() == [[1, 3]]
    torch.testing.assert_close(w, torch.tensor([[0.4 / 0.7, 0.3 / 0.7]]))
    w, _ = route(logits, _cfg(norm_topk=False))
    torch.testing.assert_close(w, torch.tensor([[0.4, 0.3]]))


def test_ties_go_to_the_lower_expert():
    w, ids = route(torch.zeros(2, 4), _cfg())
    assert ids.tolist() == [[0, 1], [0, 1]]
    torch.testing.assert_close(w, torch.full((2, 2), 0.5))


def test_bias_moves_selection_not_weights():
    cfg = _cfg(scoring="sigmoid", expert_bias=True, scaling=2.0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    s = torch.sigmoid(logits[0])
    w, ids = route(logits, cfg, bias=torch.zeros(4))
    assert ids.tolist() == [[0, 1]]
    bias = torch.tensor([0.0, 0.0, 0.0, 1.0])  # lifts expert 3 to the top, for selection only
    w, ids = route(logits, cfg, bias=bias)
    assert ids.tolist() == [[3, 0]]
    want = torch.stack([s[3], s[0]]) / (s[0] + s[3]) * 2.0  # unbiased scores, renormalised, scaled
    assert w[0, 0] < w[0, 1]  # the bias ranked expert 3 first; its weight is still the smaller
    torch.testing.assert_close(w[0], want)


def test_group_limit_excludes_experts_of_losing_groups():
    # groups {0,1} {2,3} {4,5} {6,7}; group scores = sum of their two best sigmoid scores
    cfg = MoEConfig(num_experts=8, top_k=2, expert_size=8, layers=(0,), scoring="sigmoid",
                    n_group=4, topk_group=1, expert_bias=True)
    logits = torch.tensor([[3.0, -9.0, 2.0, 2.0, -9.0, -9.0, -9.0, -9.0]])
    # expert 0 is the single best, but group {2,3} has the best pair sum: both picks come from it
    _, ids = route(logits, cfg, bias=torch.zeros(8))
    assert ids.tolist() == [[2, 3]]
    cfg2 = MoEConfig(**{**cfg.__dict__, "topk_group": 2})
    _, ids = route(logits, cfg2, bias=torch.zeros(8))
    assert ids.tolist() == [[0, 2]]  # both groups allowed: the two best experts overall, ties low-first


# ------------------------------------------------------------------ benchmark shapes

@pytest.mark.parametrize("shape,layers", [("llada2-mini", (1,)), ("sdar-30b-a3b", (0, 1))])
def test_tiny_moe_shapes_build(shape, layers):
    from optimus.bench.shapes import random_model

    model = random_model(shape, device="cpu", dtype=torch.float32, tiny=True).model
    assert model.spec.arch.moe.layers == layers
    pos = torch.arange(8)[None]
    logits, _ = dense_forward(model, torch.arange(8)[None], pos, _block_mask(model.spec, pos))
    assert torch.isfinite(logits).all()


def test_tiny_llada2_mini_runs_schedule4(monkeypatch):
    """The offline benchmark's schedule4 (4 tokens/step, block 32) on a shrunk random MoE shape;
    engine options (moe_check's graph limit) reach the engine."""
    from optimus.bench.offline import run_schedule4
    from optimus.bench.timed_runs import Target

    built = []
    make_llm = Target.llm
    monkeypatch.setattr(Target, "llm", lambda *a, **kw: built.append(make_llm(*a, **kw)) or built[-1])
    rows = run_schedule4(Target(device="cpu", tiny=True), "llada2-mini", [2], prompt_len=16, gen_len=32,
                         graph_max_tokens=2048)
    assert len(rows) == 1 and rows[0]["output_tokens"] == 2 * 32 and rows[0]["output_tok_s"] > 0
    assert built[0].engine.config.runner.graph_max_tokens == 2048


# ------------------------------------------------------------------ engine and kernel paths

@pytest.mark.parametrize("family", ["sdar_moe", "llada2_moe"])
def test_fused_path_matches_torch_path(family, triton_device):
    """model_kernels="triton": fused norms/rotary (partial for LLaDA2.0) and the Triton MoE
    kernel (CPU: Triton's interpreter) give the torch path's logits."""
    from optimus import toggles

    model, spec = make_tiny_model(family, seed=4)
    model = model.to(triton_device)
    ids = torch.randint(0, 320, (2, 6), generator=torch.Generator().manual_seed(5)).to(triton_device)
    pos = torch.arange(6, device=triton_device).expand(2, 6)
    mask = _block_mask(spec, pos)
    with torch.no_grad(), toggles.override(model_kernels="torch"):
        want = dense_forward(model, ids, pos, mask)[0]
    with torch.no_grad(), toggles.override(model_kernels="triton"):
        got = dense_forward(model.fuse_projections(), ids, pos, mask)[0]
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("family", ["sdar_moe", "llada2_moe"])
def test_engine_equals_block_diffusion_reference(family):
    """The paged engine (C = block) reproduces SDAR's published block-diffusion loop token for
    token on the MoE models: paged attention, partial rotary and routing agree with dense."""
    from fixtures.engine import tiny_loaded
    from optimus.core.params import SamplingParams
    from optimus.engine.llm import LLM
    from optimus.reference import sdar as ref_sdar

    loaded = tiny_loaded(family, block_size=4)
    block, gen = 4, 11
    prompts = [[5, 9, 13], list(range(20, 31))]
    llm = LLM(loaded=loaded, policy=f"fixed:{block}", device="cpu", num_pages=256, page_size=4)
    params = SamplingParams(max_tokens=gen, threshold=0.9, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, [params] * len(prompts))):
        ref = ref_sdar.block_diffusion_generate(
            loaded.model, prompt, gen_length=gen, block_length=block, denoising_steps=block,
            remasking_strategy="low_confidence_dynamic", confidence_threshold=0.9)
        assert list(out.token_ids) == ref.generated[0, :gen].tolist()
