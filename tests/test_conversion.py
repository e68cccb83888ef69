"""Converting an AR chat model into a block-diffusion one: self-chat data, the low-rank adapter
trainer, and adapter directories the loader merges over their base."""

from __future__ import annotations

import dataclasses
import gzip
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from optimus.models.adapter import ADAPTER_WEIGHTS, LORA_A, read_adapter_config
from optimus.models.errors import LoadError, UnexpectedTensorError
from optimus.models.loader import load_model
from optimus_lab.train.attention import TrainBackend
from optimus_lab.train.convert import Conversion, build, save
from optimus_lab.train.lora import adapter_tensors, merged_copy
from optimus_lab.train.pack import CLEAN_FLAG, load_rows, save_rows
from optimus_lab.train.selfchat import (Conversation, SelfChatConfig, generate_conversations, question_prefix,
                                        read_conversations, write_dataset)
from fixtures.checkpoints import make_tiny_checkpoint, special_ids

FAMILY = "qwen2"  # causal, ChatML, q/k/v biases: the conversion keeps them


@pytest.fixture()
def base(tmp_path):
    return make_tiny_checkpoint(tmp_path / "base", FAMILY)


def _ids() -> dict[str, int]:
    s = special_ids(FAMILY)
    return {"mask_id": 7, "eos_id": s["<|im_end|>"], "fill_id": s["<|endoftext|>"]}


def _forward(model, ids: list[int]) -> torch.Tensor:
    n = len(ids)
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    hidden = model(torch.tensor(ids), torch.arange(n), TrainBackend(mask, 1))
    return model.logits(hidden)


def _trained(base, block: int = 4):
    config, model = build(Conversion(str(base), rank=4, alpha=8.0), _ids(), block)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stand-in for training: move every trained tensor off its start
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return config, model


def test_a_saved_adapter_loads_as_the_trained_model(base, tmp_path):
    config, model = _trained(base)
    save(Conversion(str(base), rank=4, alpha=8.0), config, model, tmp_path / "adapter")
    loaded = load_model(tmp_path / "adapter", dtype="float32", device="cpu", progress=False)
    assert loaded.spec.family == "sdar" and loaded.spec.block_size == 4 and loaded.spec.mask_id == 7
    assert not loaded.spec.arch.qk_norm and loaded.spec.arch.qkv_bias
    ids = [5, 9, 11, 4, 30, 2]
    torch.testing.assert_close(_forward(loaded.model, ids), _forward(merged_copy(model), ids), atol=2e-2, rtol=0)
    # Only low-rank factors and 1-D tensors are stored: the adapter is small next to the base.
    stored = adapter_tensors(model)
    assert all(n.endswith((LORA_A, ".lora_B")) or t.dim() == 1 for n, t in stored.items())
    assert any(n.endswith(LORA_A) for n in stored)


def test_the_base_is_untouched_before_training(base):
    _, model = build(Conversion(str(base), rank=4), _ids(), 4)
    plain = load_model(base, dtype="float32", device="cpu", progress=False).model
    ids = [5, 9, 11, 4]
    torch.testing.assert_close(_forward(merged_copy(model), ids), _forward(plain, ids))


def test_adapter_errors_name_the_problem(base, tmp_path):
    config, model = _trained(base)
    save(Conversion(str(base), rank=4, alpha=8.0), config, model, tmp_path / "a")
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(tmp_path / "a" / ADAPTER_WEIGHTS))
    save_file({**tensors, "model.layers.9.mlp.up_proj.weight.lora_A": torch.zeros(4, 8)},
              str(tmp_path / "a" / ADAPTER_WEIGHTS))
    with pytest.raises(UnexpectedTensorError, match="layers.9"):
        load_model(tmp_path / "a", device="cpu", progress=False)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["format"] = "peft"
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="format"):
        read_adapter_config(tmp_path / "a")


def test_a_pinned_base_file_must_match_its_checksum(tmp_path):
    from optimus.models.adapter import AdapterConfig
    from optimus.models.sources import resolve_base
    other = tmp_path / "base.gguf"
    other.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(LoadError, match="sha256"):
        resolve_base(AdapterConfig(str(other), "0" * 64, 4, 8.0), progress=False)


def _convs(n: int) -> list[Conversation]:
    ids = _ids()
    return [Conversation(f"question {i}", tuple(range(20, 26 + i % 5)), tuple(range(40, 45 + i % 7)) + (ids["eos_id"],))
            for i in range(n)]


def test_dataset_rows_flag_prompts_and_align_examples_to_blocks(tmp_path):
    meta = write_dataset(_convs(60), tmp_path, SelfChatConfig(val_every=10), _ids(), seq_len=64, block=8)
    rows = load_rows(tmp_path / "chat_train.bin.gz", 64)
    assert meta["rows"]["chat_train"] == len(rows) and meta["rows"]["chat_val"] > 0
    flagged = (rows & CLEAN_FLAG) != 0
    starts = np.flatnonzero(flagged[0] & ~np.concatenate([[False], flagged[0, :-1]]))
    assert len(starts) > 1 and all(s % 8 == 0 for s in starts)  # every prompt starts a block
    assert {(r & (CLEAN_FLAG - 1)) for r in rows[0][flagged[0]]} <= set(range(20, 30))
    assert len(read_conversations(tmp_path, val=True)) == 6 and len(read_conversations(tmp_path)) == 60


def test_rows_written_before_large_vocabularies_still_load(tmp_path):
    legacy = np.array([[5 | (1 << 15), 6, 7, 8]], dtype=np.uint16)
    (tmp_path / "old.bin.gz").write_bytes(gzip.compress(legacy.tobytes()))
    assert load_rows(tmp_path / "old.bin.gz", 4).tolist() == [[5 | CLEAN_FLAG, 6, 7, 8]]
    big = np.array([[40_000 | CLEAN_FLAG, 49_151]])
    save_rows(big, tmp_path / "new.bin.gz")
    assert load_rows(tmp_path / "new.bin.gz", 2).tolist() == big.tolist()


def test_self_chat_keeps_finished_distinct_questions_and_finished_answers():
    tok = load_model("default", device="cpu", progress=False).tokenizer
    assert question_prefix(tok).endswith("<|im_start|>user\n")

    class FakeLLM:
        tokenizer = tok

        def generate(self, prompts, params):
            if isinstance(params, list):  # questions: one duplicate, one too short, one cut off
                texts = [("What is the sea?", "stop"), ("What is the sea?", "stop"), ("Hi", "stop"),
                         ("Why is the sky blue?", "length"), ("Name a colour, please.", "stop")]
                return [SimpleNamespace(text=t, finish_reason=f, token_ids=()) for t, f in texts]
            return [SimpleNamespace(text="", finish_reason=f, token_ids=ids)
                    for f, ids in [("stop", (9, 10)), ("length", (11,))]]

    convs = generate_conversations(FakeLLM(), SelfChatConfig(conversations=5), end_of_turn=2, log=lambda _: None)
    assert [c.question for c in convs] == ["What is the sea?"]
    assert convs[0].answer_ids == (9, 10, 2)


def test_self_chat_runs_rounds_of_distinct_questions_within_its_budget():
    tok = load_model("default", device="cpu", progress=False).tokenizer
    seeds_asked = []

    class FakeLLM:
        tokenizer = tok

        def generate(self, prompts, params):
            if isinstance(params, list):  # question seeds 0 and 1 repeat across the two rounds
                seeds_asked.extend(p.seed for p in params)
                return [SimpleNamespace(text=f"Question number {p.seed % 2}?", finish_reason="stop", token_ids=())
                        for p in params]
            return [SimpleNamespace(text="", finish_reason="stop", token_ids=(9,)) for _ in prompts]

    cfg = SelfChatConfig(conversations=6, round_size=2)
    convs = generate_conversations(FakeLLM(), cfg, end_of_turn=2, log=lambda _: None)
    assert seeds_asked == list(range(6)) and [c.question for c in convs] == ["Question number 0?", "Question number 1?"]
    seeds_asked.clear()
    generate_conversations(FakeLLM(), dataclasses.replace(cfg, seconds=1e-9), end_of_turn=2, log=lambda _: None)
    assert seeds_asked == [0, 1]  # the first round overran the budget: no second


def test_fit_converts_a_base_end_to_end(base, tmp_path):
    from optimus.core.params import SamplingParams
    from optimus.engine.llm import LLM
    from optimus_lab.train.__main__ import main
    write_dataset(_convs(40), tmp_path / "data", SelfChatConfig(val_every=10), _ids(), seq_len=64, block=8)
    out = tmp_path / "converted"
    main(["fit", "--data", str(tmp_path / "data"), "--out", str(out), "--base", str(base), "--lora-rank", "4",
          "--block", "4", "--seq-len", "64", "--batch-size", "2", "--steps", "3", "--warmup", "1", "--device", "cpu",
          "--no-compile", "--attention", "mask", "--log-every", "1", "--chunk-mix", "0.5"])
    log = json.loads((out / "train_log.json").read_text())
    assert len([r for r in log["log"] if "loss" in r]) == 3 and np.isfinite(log["summary"]["heldout_loss"])
    assert read_adapter_config(out).rank == 4
    llm = LLM(loaded=load_model(out, device="cpu", progress=False), policy="fixed:4", device="cpu")
    assert len(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids) == 8


def test_keep_best_ends_on_the_lowest_held_out_loss(base, tmp_path):
    from optimus_lab.train.__main__ import main
    write_dataset(_convs(40), tmp_path / "data", SelfChatConfig(val_every=10), _ids(), seq_len=64, block=8)
    out = tmp_path / "converted"
    main(["fit", "--data", str(tmp_path / "data"), "--out", str(out), "--base", str(base), "--lora-rank", "4",
          "--block", "4", "--seq-len", "64", "--batch-size", "2", "--steps", "3", "--warmup", "1", "--lr", "1.0",
          "--device", "cpu", "--no-compile", "--attention", "mask", "--val-every", "1", "--keep-best"])
    log = json.loads((out / "train_log.json").read_text())
    seen = {r["step"]: r["heldout_loss"] for r in log["log"] if "heldout_loss" in r}
    kept = min(seen, key=seen.get)
    # A learning rate of 1.0 overshoots by far after the first step (held-out loss about 3.9,
    # then 12 and 8 on this fixture with torch 2.13 CPU), so the kept weights are not the last.
    assert kept < max(seen)
    assert log["summary"]["kept_step"] == kept
    assert log["summary"]["heldout_loss"] == pytest.approx(seen[kept], rel=1e-5)  # measured again on the saved weights


def test_best_weights_are_restored_over_later_ones():
    from optimus_lab.train.loop import _Best
    model = torch.nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    best = _Best()
    for step, loss in ((1, 2.0), (2, 1.0), (3, 1.5)):
        with torch.no_grad():
            model.weight.fill_(step)
            model.bias.fill_(step)
        best.offer(model, step, loss)
    best.restore(model)
    assert best.step == 2 and torch.all(model.weight == 2)
    assert torch.all(model.bias == 3)  # only trained parameters are kept


def test_auto_is_the_shipped_dllm_when_its_base_is_at_hand_else_the_tasks_model(base, tmp_path, monkeypatch, caplog):
    from optimus.models import sources as auto
    from optimus.models.sources import resolve_model
    config, model = _trained(base)
    save(Conversion(str(base), rank=4, alpha=8.0), config, model, tmp_path / "shipped")
    monkeypatch.setattr(auto, "shipped_dllm_dir", lambda: tmp_path / "shipped")
    monkeypatch.delenv("OPTIMUS_AUTO_MODEL", raising=False)
    assert auto.auto_model(progress=False) == auto.SHIPPED_DLLM
    source = resolve_model("auto", progress=False)
    assert source.location == tmp_path / "shipped" and source.identity.name == auto.SHIPPED_DLLM

    cfg = json.loads((tmp_path / "shipped" / "adapter_config.json").read_text())
    cfg["base"]["model"] = str(tmp_path / "gone")  # no network, no cache: the base cannot be had
    (tmp_path / "shipped" / "adapter_config.json").write_text(json.dumps(cfg))
    with caplog.at_level("WARNING"):
        assert resolve_model("auto", progress=False).name == "default"
    assert [r.message for r in caplog.records if "22M tasks model" in r.message]

    monkeypatch.setenv("OPTIMUS_AUTO_MODEL", str(base))
    assert resolve_model("auto", progress=False).location == base
