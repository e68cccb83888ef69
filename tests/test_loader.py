"""Loader: round trips of every family's tiny checkpoint, and one clear error per bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from optimus.models.checkpoint_writer import save_checkpoint
from optimus.models.loader import (
    ConfigFieldError, LoadError, MissingFileError, MissingTensorError, ShapeMismatchError, UnexpectedTensorError,
    UnknownArchitectureError, UnsafeFormatError, load_model,
)
from optimus.models.dense import dense_forward
from fixtures.checkpoints import role_ids, tiny_config

from conftest import ALL_FAMILIES


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return dense_forward(model, ids)[0]


def _stored_names(path: Path) -> set[str]:
    names: set[str] = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as handle:
            names.update(handle.keys())
    return names


# ------------------------------------------------------------------ round trips

@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_round_trip_gives_identical_logits(family, shards, tiny_checkpoint, tiny_model):
    path = tiny_checkpoint(family, shards=shards, seed=3)
    loaded = load_model(path, device="cpu", progress=False)
    model, spec = tiny_model(family, seed=3)
    assert loaded.spec == spec
    assert loaded.path == path and not loaded.model.training
    assert loaded.model.lm_head.weight.dtype == torch.float32
    ids = torch.randint(0, 320, (2, 9))
    assert torch.equal(_logits(loaded.model, ids), _logits(model, ids))
    assert loaded.generation_config["eos_token_id"] is not None
    assert loaded.tokenizer.token_to_id(loaded.tokenizer.special_token("eos")) in spec.eos_ids
    if shards > 1:
        assert len(list(path.glob("model-*-of-00003.safetensors"))) == 3
        assert not (path / "model.safetensors").exists()


def test_llada_checkpoint_uses_llada_tensor_names(tiny_checkpoint):
    names = _stored_names(tiny_checkpoint("llada"))
    assert "model.transformer.wte.weight" in names and "model.transformer.ff_out.weight" in names
    assert "model.transformer.blocks.1.attn_out.weight" in names
    assert not any(n.startswith("model.layers.") for n in names)


def test_special_ids_completed_from_tokenizer(tiny_checkpoint):
    """LLaDA's config names neither bos nor <|eot_id|>: they come from the tokenizer."""
    spec = load_model(tiny_checkpoint("llada"), device="cpu", progress=False).spec
    r = role_ids("llada")
    assert spec.bos_id == r["bos"] and spec.mask_id == r["mask"]
    assert r["eos"] in spec.eos_ids and r["eot"] in spec.eos_ids


def test_tied_embeddings_share_one_tensor(tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    assert "lm_head.weight" not in _stored_names(path)  # HF omits a tied head
    model = load_model(path, device="cpu", progress=False).model
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tied_checkpoint_that_repeats_the_head_loads(tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(path / "model.safetensors"))
    model = load_model(path, device="cpu", progress=False).model
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_dtype_cast_while_reading(tiny_checkpoint, tiny_model):
    path = tiny_checkpoint("sdar")
    loaded = load_model(path, dtype="bfloat16", device="cpu", progress=False)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.model.model.rotary.inv_freq.dtype == torch.float32  # rotary stays fp32
    reference, _ = tiny_model("sdar", dtype="bfloat16")
    ids = torch.randint(0, 320, (1, 8))
    assert torch.equal(_logits(loaded.model, ids), _logits(reference, ids))


def test_bf16_checkpoint_loads_as_fp32(tiny_checkpoint, tiny_model):
    path = tiny_checkpoint("dream", dtype="bfloat16")
    loaded = load_model(path, dtype="float32", device="cpu", progress=False)
    reference, _ = tiny_model("dream", dtype="bfloat16")
    assert torch.equal(loaded.model.model.embed_tokens.weight, reference.model.embed_tokens.weight.float())


def test_auto_dtype_is_fp32_on_cpu(tiny_checkpoint):
    loaded = load_model(tiny_checkpoint("llama"), device="cpu", progress=False)
    assert loaded.model.model.norm.weight.dtype == torch.float32


@pytest.mark.parametrize("family,shards", [("llada", 1), ("qwen2", 2), ("qwen3", 1)])
def test_save_checkpoint_round_trip(family, shards, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(family, seed=5)
    loaded = load_model(source, device="cpu", progress=False)
    config = json.loads((source / "config.json").read_text())
    out = save_checkpoint(loaded.model, config, tmp_path / "saved", shards=shards, tokenizer_dir=source)
    assert _stored_names(out) == _stored_names(source)  # the family's own names, tied head omitted
    again = load_model(out, device="cpu", progress=False)
    ids = torch.randint(0, 320, (1, 7))
    assert torch.equal(_logits(again.model, ids), _logits(loaded.model, ids))
    assert again.spec == loaded.spec


# ------------------------------------------------------------------ errors

def test_errors_are_value_errors():
    for cls in (MissingFileError, UnsafeFormatError, ConfigFieldError, UnknownArchitectureError,
                UnexpectedTensorError, MissingTensorError, ShapeMismatchError):
        assert issubclass(cls, LoadError) and issubclass(cls, ValueError)


def test_missing_directory(tmp_path):
    with pytest.raises(MissingFileError, match="model directory not found: .*nowhere"):
        load_model(tmp_path / "nowhere", device="cpu")


@pytest.mark.parametrize("fname", ["config.json", "tokenizer.json"])
def test_missing_file_is_named(fname, tiny_checkpoint):
    path = tiny_checkpoint("dream")
    (path / fname).unlink()
    with pytest.raises(MissingFileError, match=f"missing file: {fname}"):
        load_model(path, device="cpu", progress=False)


def test_dream_style_tokenizer_files_load(tiny_checkpoint):
    path = tiny_checkpoint("dream", tokenizer_format="vocab_merges")
    loaded = load_model(path, device="cpu", progress=False)
    assert loaded.spec == load_model(tiny_checkpoint("dream"), device="cpu", progress=False).spec
    assert loaded.tokenizer.encode("<|mask|>") == [loaded.spec.mask_id]


def test_missing_shard_is_named(tiny_checkpoint):
    path = tiny_checkpoint("sdar", shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MissingFileError, match="model-00002-of-00002.safetensors"):
        load_model(path, device="cpu", progress=False)


def test_no_weights(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    (path / "model.safetensors").unlink()
    with pytest.raises(MissingFileError, match=r"no \*\.safetensors weights"):
        load_model(path, device="cpu", progress=False)


@pytest.mark.parametrize("fname", ["pytorch_model.bin", "model.pt"])
def test_pickle_weights_refused(fname, tiny_checkpoint):
    path = tiny_checkpoint("llama")
    (path / "model.safetensors").unlink()
    (path / fname).write_bytes(b"not loaded, never unpickled")
    with pytest.raises(UnsafeFormatError, match=f"refusing pickle weights.*{fname}"):
        load_model(path, device="cpu", progress=False)


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def test_unknown_architecture(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    _edit_config(path, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnknownArchitectureError, match="unknown architecture: model_type='gpt2'"):
        load_model(path, device="cpu", progress=False)


def test_missing_config_field(tiny_checkpoint):
    path = tiny_checkpoint("qwen2")
    _edit_config(path, hidden_size=None)
    with pytest.raises(ConfigFieldError, match="missing field 'hidden_size'"):
        load_model(path, device="cpu", progress=False)


@pytest.mark.parametrize("family,changes,message", [
    ("llada", {"mask_token_id": 5000}, r"mask_token_id=5000 is out of range for vocab_size=384"),
    ("sdar", {"block_size": 0}, r"block_size=0 must be positive"),
    ("qwen2", {"num_key_value_heads": 3}, r"num_heads=4 is not a multiple of num_kv_heads=3"),
    ("dream", {"num_hidden_layers": -1}, r"num_layers=-1 must be positive"),
])
def test_config_field_out_of_range(family, changes, message, tiny_checkpoint):
    path = tiny_checkpoint(family)
    _edit_config(path, **changes)
    with pytest.raises(ConfigFieldError, match=message):
        load_model(path, device="cpu", progress=False)


def test_invalid_config_json(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    (path / "config.json").write_text("{not json")
    with pytest.raises(LoadError, match="config.json is not valid JSON"):
        load_model(path, device="cpu", progress=False)


def _rewrite_weights(path: Path, edit) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_unexpected_tensor_is_named(tiny_checkpoint):
    path = tiny_checkpoint("llada")
    _rewrite_weights(path, lambda t: t.update({"model.transformer.blocks.0.mystery.weight": torch.zeros(2)}))
    with pytest.raises(UnexpectedTensorError, match="model.transformer.blocks.0.mystery.weight"):
        load_model(path, device="cpu", progress=False)


def test_tensor_for_a_layer_that_does_not_exist(tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    _rewrite_weights(path, lambda t: t.update({"model.layers.7.mlp.up_proj.weight": torch.zeros(128, 64)}))
    with pytest.raises(UnexpectedTensorError, match=r"model\.layers\.7\.mlp\.up_proj\.weight"):
        load_model(path, device="cpu", progress=False)


def test_missing_tensor_is_named_in_checkpoint_layout(tiny_checkpoint):
    path = tiny_checkpoint("llada")
    _rewrite_weights(path, lambda t: t.pop("model.transformer.blocks.1.ff_out.weight"))
    with pytest.raises(MissingTensorError, match=r"missing 1 tensor.*model\.transformer\.blocks\.1\.ff_out\.weight"):
        load_model(path, device="cpu", progress=False)


def test_shape_mismatch_names_tensor_and_shapes(tiny_checkpoint):
    path = tiny_checkpoint("dream")
    _rewrite_weights(path, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    with pytest.raises(ShapeMismatchError,
                       match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*shape \[16, 64\], expected \[32, 64\]"):
        load_model(path, device="cpu", progress=False)


def test_unknown_dtype(tiny_checkpoint):
    with pytest.raises(LoadError, match="unknown dtype 'float8'"):
        load_model(tiny_checkpoint("llama"), dtype="float8", device="cpu")


def test_default_model_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "optimus.default_model", None)  # import now raises ImportError
    with pytest.raises(LoadError, match="default model is not available"):
        load_model("default", device="cpu")


def test_tiny_config_uses_family_field_names():
    assert {"d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "embedding_size",
            "mask_token_id"} <= set(tiny_config("llada"))
    assert tiny_config("dream")["model_type"] == "Dream" and "mask_token_id" in tiny_config("dream")
    assert tiny_config("sdar")["model_type"] == "sdar" and tiny_config("sdar")["block_size"] == 4


def test_module_is_built_on_meta_then_filled(monkeypatch, tiny_checkpoint):
    """No random-init fp32 copy: the module starts on ``meta`` and only read tensors fill it."""
    import optimus.models.loader as loader_module

    built_on = []

    class Recording(loader_module.DecoderLM):
        def __init__(self, spec):
            super().__init__(spec)
            built_on.append(self.lm_head.weight.device.type)

    monkeypatch.setattr(loader_module, "DecoderLM", Recording)
    model = load_model(tiny_checkpoint("llada"), dtype="float16", device="cpu", progress=False).model
    assert built_on == ["meta"]
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.lm_head.weight.dtype == torch.float16


# --- corrupt weight files: the loader's own error, naming the file; the CLI prints one line -----

def _corrupt_checkpoint(tiny_checkpoint, how: str) -> tuple[Path, Path]:
    root = tiny_checkpoint("llada")
    weights = root / "model.safetensors"
    data = weights.read_bytes()
    if how == "empty":
        weights.write_bytes(b"")
    elif how == "short":
        weights.write_bytes(data[:5])
    elif how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "garbage-header":
        weights.write_bytes((2000).to_bytes(8, "little") + b"{not json" + b"\0" * 3000)
    elif how == "huge-header":
        weights.write_bytes((2**40).to_bytes(8, "little") + data[8:])
    return root, weights


CORRUPTIONS = ("empty", "short", "truncated", "garbage-header", "huge-header")


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_weight_file_raises_load_error_naming_it(how, tiny_checkpoint):
    from optimus.models.loader import CorruptFileError
    root, weights = _corrupt_checkpoint(tiny_checkpoint, how)
    with pytest.raises(LoadError, match="model.safetensors") as info:
        load_model(root, device="cpu", progress=False)
    assert isinstance(info.value, CorruptFileError)
    assert str(weights) in str(info.value)


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_cli_reports_a_corrupt_weight_file_in_one_line(how, tiny_checkpoint, capsys):
    from optimus.cli import main
    root, weights = _corrupt_checkpoint(tiny_checkpoint, how)
    assert main(["generate", "--model", str(root), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(weights) in err and "Traceback" not in err
