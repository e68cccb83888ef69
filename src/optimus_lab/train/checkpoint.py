"""Write a trained ``DecoderLM`` as an ordinary HF directory of model_type ``sdar``.

The directory loads through the project's loader like any SDAR checkpoint: Qwen3 field names,
``block_size``, ``mask_token_id``; weights in bf16 safetensors (the tied LM head is not stored).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from optimus.models.registry import spec_from_config
from optimus.models.spec import ArchConfig
from optimus.models.transformer import DecoderLM


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int = 8192
    hidden_size: int = 384
    num_layers: int = 12
    num_heads: int = 6
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 1024
    max_position: int = 512
    block_size: int = 32
    rope_theta: float = 10000.0


def hf_config(shape: ModelShape, mask_id: int, eos_id: int, eot_id: int, pad_id: int) -> dict:
    arch = ArchConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, num_layers=shape.num_layers,
                      num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                      intermediate_size=shape.intermediate_size, rope_theta=shape.rope_theta, qk_norm=True,
                      tie_embeddings=True, max_position=shape.max_position)
    return sdar_config(arch, shape.block_size, mask_id, eos_id, eot_id, pad_id)


def sdar_config(arch: ArchConfig, block_size: int, mask_id: int, eos_id: int, eot_id: int, pad_id: int) -> dict:
    """config.json of a block-diffusion model of ``arch``'s shape (Qwen3 field names)."""
    config = {
        "architectures": ["SDARForCausalLM"],
        "model_type": "sdar",
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "intermediate_size": arch.intermediate_size,
        "hidden_act": "silu",
        "max_position_embeddings": arch.max_position,
        "rope_theta": arch.rope_theta,
        "rms_norm_eps": arch.rms_eps,
        "attention_bias": arch.qkv_bias,
        "tie_word_embeddings": arch.tie_embeddings,
        "block_size": block_size,
        "mask_token_id": mask_id,
        "eos_token_id": eos_id,  # <|im_end|>: ends an answer
        "eot_token_id": eot_id,  # <|endoftext|>: fills the rest of the last block
        "pad_token_id": pad_id,
        "bos_token_id": None,
        "torch_dtype": "bfloat16",
    }
    if not arch.qk_norm:  # converted from a Llama-layout base
        config["use_qk_norm"] = False
    return config


def generation_config(config: dict) -> dict:
    return {"block_size": config["block_size"], "mask_token_id": config["mask_token_id"],
            "eos_token_id": [config["eos_token_id"], config["eot_token_id"]],
            "pad_token_id": config["pad_token_id"], "threshold": 0.9, "max_new_tokens": 128}


def build_model(config: dict) -> DecoderLM:
    return DecoderLM(spec_from_config(config))


def bf16_state(model: DecoderLM) -> dict[str, torch.Tensor]:
    """bf16 copies of the parameters; a tied head is not written (HF style, the loader re-ties)."""
    tied = model.spec.arch.tie_embeddings
    return {k: v.detach().to("cpu", torch.bfloat16).clone().contiguous() for k, v in model.state_dict().items()
            if not (tied and k == "lm_head.weight")}


def save_weights(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int | None = None) -> list[str]:
    """model.safetensors, or model-0000i.safetensors shards when ``max_shard_bytes`` is set."""
    if max_shard_bytes is None:
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    shards, cur, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name], size = t, size + nbytes
    shards.append(cur)
    names = [f"model-{i:05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
    return names


def load_weights(model: DecoderLM, src_dir: Path) -> None:
    """Copy an HF directory's weights (this module's layout, one file or shards) into ``model``;
    every parameter must be present with its shape (a tied head is re-tied, not read)."""
    state: dict[str, torch.Tensor] = {}
    for path in sorted(Path(src_dir).glob("model*.safetensors")):
        state.update(load_file(str(path)))
    expected = bf16_state(model)
    if set(state) != set(expected):
        raise ValueError(f"{src_dir}: tensors differ from the model: missing {sorted(set(expected) - set(state))}, "
                         f"unexpected {sorted(set(state) - set(expected))}")
    with torch.no_grad():
        params = dict(model.named_parameters()) | dict(model.named_buffers())
        for name, t in state.items():
            if params[name].shape != t.shape:
                raise ValueError(f"{src_dir}: {name} has shape {tuple(t.shape)}, the model {tuple(params[name].shape)}")
            params[name].copy_(t)


def merge_shards(src_dir: Path, out_dir: Path) -> None:
    state: dict[str, torch.Tensor] = {}
    for path in sorted(src_dir.glob("model-*.safetensors")):
        state.update(load_file(str(path)))
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def write_hf_dir(out_dir: Path, config: dict, state: dict[str, torch.Tensor], tokenizer_dir: Path,
                 max_shard_bytes: int | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out_dir / name)
    save_weights(state, out_dir, max_shard_bytes)


def checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
