"""GGUF files written here with the ``gguf`` package's writer, as llama.cpp's converter writes
them (llama: Q/K rows permuted; quantized F16/BF16/Q8_0/Q4_0/Q4_1 tensors; byte-level BPE
tokenizer metadata; chat template), load to exactly the dequantized weights and decode the
same tokens as those weights saved as safetensors."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from optimus.cli import main
from optimus.core.params import SamplingParams
from optimus.engine.llm import LLM
from optimus.models.checkpoint_writer import write_safetensors
from optimus.models.errors import CorruptFileError, UnsupportedFormatError
from optimus.models.loader import load_model
from fixtures import make_tiny_checkpoint
from fixtures.gguf_files import write_gguf


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def pair(request, tmp_path_factory):
    """(family, GGUF path, directory with the dequantized weights as safetensors)."""
    family = request.param
    root = tmp_path_factory.mktemp(f"gguf-{family}")
    ckpt = make_tiny_checkpoint(root / "original", family)
    expected = write_gguf(ckpt, family, root / "tiny.gguf")
    same = make_tiny_checkpoint(root / "dequantized", family)
    (same / "model.safetensors").unlink()
    write_safetensors(expected, same)
    return family, root / "tiny.gguf", same


def test_weights_are_the_dequantized_checkpoint(pair):
    family, path, same = pair
    ours = load_model(path, dtype="float32", device="cpu", progress=False)
    ref = load_model(same, dtype="float32", device="cpu", progress=False)
    assert ours.spec.arch == ref.spec.arch and ours.spec.family == family
    assert ours.spec.arch.tie_embeddings == (family == "qwen3")
    ref_state = ref.model.state_dict()
    for name, tensor in ours.model.state_dict().items():
        assert torch.equal(tensor, ref_state[name]), name  # Q/K un-permuted exactly


def test_tokenizer_and_chat_template_come_from_the_metadata(pair):
    _, path, same = pair
    ours = load_model(path, dtype="float32", device="cpu", progress=False).tokenizer
    ref = load_model(same, dtype="float32", device="cpu", progress=False).tokenizer
    for text in ("the quick brown fox jumps over the lazy dog.", "what is 482 + 397?\n\n  def add(a, b):"):
        assert ours.encode(text, add_special_tokens=True) == ref.encode(text, add_special_tokens=True)
        assert ours.decode(ours.encode(text)) == text
    chat = [{"role": "user", "content": "hello world!"}]
    assert ours.apply_chat_template(chat) == ref.apply_chat_template(chat)
    assert ours.end_of_turn_id == ref.end_of_turn_id and ours.eos_token_id == ref.eos_token_id


def test_generates_the_same_tokens_as_the_dequantized_safetensors(pair):
    _, path, same = pair
    outs = []
    for model in (path, same):
        llm = LLM(loaded=load_model(model, dtype="float32", device="cpu", progress=False), policy="ar",
                  device="cpu", num_pages=64, page_size=4)
        prompt = llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]))
        outs.append(llm.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids)
    assert outs[0] == outs[1] and len(outs[0]) == 12


def test_a_truncated_file_is_one_line_naming_it(pair, tmp_path, capsys):
    _, path, _ = pair
    data = path.read_bytes()
    for size in (100, len(data) // 2, len(data) - 10):
        cut = tmp_path / f"cut-{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(CorruptFileError, match=f"damaged GGUF file .*cut-{size}.gguf"):
            load_model(cut, device="cpu", progress=False)
        assert main(["generate", "--model", str(cut), "--prompt", "x"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(cut) in err, err


def test_an_unsupported_architecture_is_named(tmp_path):
    out = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(str(out), "phi2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedFormatError, match="holds a 'phi2' model; supported GGUF architectures: llama"):
        load_model(out, device="cpu", progress=False)
