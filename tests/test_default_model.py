"""The shipped default model: loads through the loader, matches its recorded checksum, and
decodes deterministically to text."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from optimus.default_model import WEIGHTS, default_model_dir, recorded_checksum


@pytest.fixture(scope="module")
def loaded():
    from optimus.models.loader import load_model
    return load_model("default", device="cpu", progress=False)


def test_directory_is_a_small_sdar_checkpoint():
    root = default_model_dir()
    cfg = json.loads((root / "config.json").read_text())
    assert cfg["model_type"] == "sdar" and cfg["block_size"] == 32
    assert cfg["max_position_embeddings"] >= 512
    assert (root / WEIGHTS).stat().st_size < 50 * 10**6
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "CHECKSUM"):
        assert (root / name).is_file(), name


def test_checksum_matches_recorded():
    digest = hashlib.sha256((default_model_dir() / WEIGHTS).read_bytes()).hexdigest()
    assert digest == recorded_checksum()


def test_loads_as_block_diffusion_model(loaded):
    spec = loaded.spec
    assert spec.family == "sdar" and spec.block_size == 32 and spec.is_diffusion
    assert loaded.tokenizer.token_to_id("<|mask|>") == spec.mask_id
    assert loaded.tokenizer.token_to_id("<|im_end|>") in spec.eos_ids
    n = sum(p.numel() for p in loaded.model.parameters())
    assert 15e6 <= n <= 25e6


def test_chat_template_and_digit_split(loaded):
    tok = loaded.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode("12345")
    assert len(ids) == 5 and tok.decode(ids) == "12345"


def test_greedy_generation_is_deterministic_text(loaded):
    from optimus.reference.sdar import block_diffusion_generate
    tok = loaded.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 123 + 456?"}]))
    runs = [block_diffusion_generate(loaded.model, torch.tensor([prompt]), gen_length=32,
                                     stop_ids=loaded.spec.eos_ids) for _ in range(2)]
    first, second = (r.sequence[0, r.prompt_length:].tolist() for r in runs)
    assert first == second
    end = next(i for i, t in enumerate(first) if t in loaded.spec.eos_ids)
    assert tok.decode(first[:end]) == "579"  # the shipped model does 3-digit addition
