"""Read a GGUF file (llama.cpp's single-file format) as a checkpoint: a config.json-style dict
from its metadata, and its tensors under Hugging Face names, each dequantized when read.

The ``gguf`` package (pure Python + numpy) parses the file through a memory map and
dequantizes (F32, F16, BF16, Q8_0, Q4_0, Q4_1 and the other block types it implements); the
loader then casts each tensor to the serving dtype. llama.cpp's converter permutes the rows of
a llama-architecture checkpoint's Q and K projections (it pairs rotary dimensions (i, i+d/2)
as adjacent rows, for its interleaved RoPE); :func:`unpermute_qk` undoes that, so the weights
are the original checkpoint's, for the Hugging Face (rotate-half) RoPE this decoder uses.
Every problem with the file is one :class:`~optimus.models.errors.LoadError` line naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from optimus.models.errors import CorruptFileError, LoadError, UnsupportedFormatError

# general.architecture -> (config model_type, HF architectures entry, Q/K rows permuted by llama.cpp)
ARCHITECTURES: dict[str, tuple[str, str, bool]] = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", False),
}
FLOAT_TYPES = ("F32", "F16", "BF16")
# Block types the gguf package dequantizes in numpy (tested here: Q8_0, Q4_0, Q4_1).
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_tensor_name(name: str) -> str | None:
    """GGUF tensor name -> Hugging Face Llama/Qwen name (None: no such weight here)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER.match(name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def unpermute_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute``: within each head, its rows were reordered from
    [x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}] (rotate-half pairs) to [x_0, y_0, x_1, y_1, ...].
    Works on a weight [heads*d, in] and on a bias [heads*d]."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


@dataclass(frozen=True)
class GGUFTensor:
    source: str  # the name in the file
    name: str | None  # the Hugging Face name (None: a tensor this decoder has no use for)
    shape: tuple[int, ...]  # torch order: [out, in]
    type_name: str
    read: Callable[[], torch.Tensor]  # float32 on the CPU, Q/K un-permuted


class GGUFFile:
    """The metadata and tensor index of one GGUF file (nothing dequantized until read)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader = _open(path)

    def get(self, key: str, default: Any = LoadError) -> Any:
        field = self._reader.fields.get(key)
        if field is None:
            if default is LoadError:
                raise CorruptFileError(f"GGUF file {self.path} lacks the metadata field {key}")
            return default
        try:
            return field.contents()
        except Exception as exc:  # a malformed value: the reader raises bare numpy errors
            raise CorruptFileError(f"damaged GGUF file {self.path}: field {key} is unreadable ({exc})") from None

    @property
    def architecture(self) -> str:
        return str(self.get("general.architecture"))

    def check_architecture(self) -> tuple[str, str, bool]:
        arch = self.architecture
        if arch not in ARCHITECTURES:
            raise UnsupportedFormatError(f"GGUF file {self.path} holds a {arch!r} model; supported GGUF "
                                         f"architectures: {', '.join(ARCHITECTURES)}")
        return ARCHITECTURES[arch]

    def config(self) -> dict:
        """The Hugging Face config.json this file's metadata describes."""
        model_type, hf_arch, _ = self.check_architecture()
        arch = self.architecture
        heads = int(self.get(f"{arch}.attention.head_count"))
        kv_heads = self.get(f"{arch}.attention.head_count_kv", heads)
        hidden = int(self.get(f"{arch}.embedding_length"))
        head_dim = int(self.get(f"{arch}.attention.key_length", hidden // heads))
        if isinstance(kv_heads, list):
            raise UnsupportedFormatError(f"GGUF file {self.path}: per-layer head counts are not supported")
        if int(self.get(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
            raise UnsupportedFormatError(f"GGUF file {self.path}: partial rotary embeddings are not supported")
        if str(self.get(f"{arch}.rope.scaling.type", "none")) not in ("none", ""):
            raise UnsupportedFormatError(f"GGUF file {self.path}: RoPE scaling "
                                         f"{self.get(f'{arch}.rope.scaling.type')!r} is not supported")
        names = {t.name for t in self._reader.tensors}
        embed = next((t for t in self._reader.tensors if t.name == "token_embd.weight"), None)
        if embed is None:
            raise CorruptFileError(f"GGUF file {self.path} has no token_embd.weight tensor")
        config = {
            "model_type": model_type, "architectures": [hf_arch],
            "vocab_size": int(self.get(f"{arch}.vocab_size", int(embed.shape[-1]))),
            "hidden_size": hidden, "num_hidden_layers": int(self.get(f"{arch}.block_count")),
            "num_attention_heads": heads, "num_key_value_heads": int(kv_heads), "head_dim": head_dim,
            "intermediate_size": int(self.get(f"{arch}.feed_forward_length")),
            "rope_theta": _decimal(self.get(f"{arch}.rope.freq_base", 10000.0)),
            "rms_norm_eps": _decimal(self.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            "max_position_embeddings": int(self.get(f"{arch}.context_length", 4096)),
            "tie_word_embeddings": "output.weight" not in names,
            "attention_bias": "blk.0.attn_q.bias" in names,
        }
        for role in ("bos", "eos", "padding"):
            token = self.get(f"tokenizer.ggml.{role}_token_id", None)
            if token is not None:
                config[f"{'pad' if role == 'padding' else role}_token_id"] = int(token)
        return config

    def tensors(self) -> Iterator[GGUFTensor]:
        """Every tensor in file order; reading one dequantizes it (and un-permutes Q/K)."""
        _, _, permuted = self.check_architecture()
        arch = self.architecture
        heads = int(self.get(f"{arch}.attention.head_count"))
        kv_heads = int(self.get(f"{arch}.attention.head_count_kv", heads))
        for t in self._reader.tensors:
            type_name = t.tensor_type.name
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
            if type_name not in FLOAT_TYPES + QUANT_TYPES:
                raise UnsupportedFormatError(f"GGUF file {self.path}: tensor {t.name} has type {type_name}; "
                                             f"supported: {', '.join(FLOAT_TYPES + QUANT_TYPES)}")
            name = hf_tensor_name(t.name)
            qk_heads = None
            if permuted and name is not None and ".self_attn.q_proj." in name:
                qk_heads = heads
            elif permuted and name is not None and ".self_attn.k_proj." in name:
                qk_heads = kv_heads
            yield GGUFTensor(t.name, name, shape, type_name, _reader_fn(self.path, t, shape, qk_heads))


def _decimal(value: Any) -> float:
    """A float32 metadata value as the config.json number it was written from (the shortest
    decimal that rounds to it: 1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _reader_fn(path: Path, tensor: Any, shape: tuple[int, ...], qk_heads: int | None) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        from gguf import quants
        try:
            values = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
            out = torch.from_numpy(values.reshape(shape).copy())  # copy: the memory map is read-only
        except (ValueError, NotImplementedError) as exc:
            raise CorruptFileError(f"damaged GGUF file {path}: tensor {tensor.name} is unreadable ({exc})") from None
        return out if qk_heads is None else unpermute_qk(out, qk_heads)
    return read


def _open(path: Path):
    """A ``GGUFReader`` for ``path``; any parse failure is one line naming the file."""
    stat = path.stat()
    return _open_cached(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=2)  # resolving a model checks the file; loading it reads it again
def _open_cached(path: str, size: int, mtime_ns: int):
    try:
        import gguf
    except ImportError:
        raise LoadError(f"loading {path} needs the gguf package: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # truncation shows up as numpy reshape/view errors
        raise CorruptFileError(f"damaged GGUF file {path}: cannot be read ({type(exc).__name__}: {exc})") from None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CorruptFileError(f"damaged GGUF file {path}: tensor {t.name} runs past the end of the file "
                                   f"({size} bytes; truncated?)")
    return reader
