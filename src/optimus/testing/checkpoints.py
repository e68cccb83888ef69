"""Tiny random checkpoints written exactly as each family ships them on the Hub.

``make_tiny_checkpoint(dir, family)`` writes ``config.json`` with the family's real field names,
random weights under the family's real tensor names (one file or shards + index),
``generation_config.json`` and a tiny byte-level BPE ``tokenizer.json`` +
``tokenizer_config.json`` whose special tokens (mask, eos, end-of-turn, chat roles) sit at ids
inside the tiny vocab, with a chat template in the family's style. Everything runs in
milliseconds on CPU.

Token ids: 0..255 are the byte alphabet, then the learned merges, then the family's special
tokens in the order listed in its :class:`TinyFamily`; the model's vocab is padded past the
tokenizer's (as real checkpoints are).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from optimus.loader import write_safetensors
from optimus.models.registry import spec_from_config
from optimus.models.spec import ModelSpec
from optimus.models.transformer import DecoderLM
from optimus.tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT

TINY_VOCAB = 384  # model vocab (embedding rows); the tokenizer uses the first ~330 ids
_NUM_MERGES = 64
_CORPUS = (
    "the quick brown fox jumps over the lazy dog. hello world! what is two plus two? "
    "the answer is four. there are three apples and the other one is here. "
    "you are a helpful assistant. please answer the question in one sentence. "
    "def add(a, b):\n    return a + b\n"
)

# Chat templates in each family's style (our own wording of the formats in DESIGN.md).
LLAMA3_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first %}{{ bos_token }}{% endif -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif -%}"
)
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen2.5 / Dream: a default system turn when the conversation has none.
CHATML_SYSTEM_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}" + CHATML_TEMPLATE
)


@dataclass(frozen=True)
class TinyFamily:
    """How one family lays out its files. ``specials`` get consecutive ids after the merges."""

    name: str
    specials: tuple[str, ...]
    roles: dict[str, str]  # bos/eos/pad/mask/eot -> token string (absent role: none)
    chat_template: str
    split: str = QWEN2_SPLIT  # pre-tokenizer pattern (the merges are shared by all families)
    bos_post_processor: bool = False  # tokenizer.json prepends bos when add_special_tokens
    tie_embeddings: bool = False
    extra_tokenizer_config: dict = field(default_factory=dict)


_LLAMA3_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

FAMILIES: dict[str, TinyFamily] = {
    "llada": TinyFamily(
        "llada", ("<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>") + _LLAMA3_SPECIALS,
        {"bos": "<|startoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>",
         "mask": "<|mdm_mask|>", "eot": "<|eot_id|>"},
        LLAMA3_TEMPLATE, split=LLAMA3_SPLIT, bos_post_processor=True),
    "dream": TinyFamily(
        "dream", _CHATML_SPECIALS + ("<|beginoftext|>", "<|mask|>"),
        {"bos": "<|beginoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>",
         "mask": "<|mask|>", "eot": "<|im_end|>"},
        CHATML_SYSTEM_TEMPLATE, extra_tokenizer_config={"mask_token": "<|mask|>"}),
    "sdar": TinyFamily(
        "sdar", _CHATML_SPECIALS + ("<|MASK|>",),
        {"eos": "<|im_end|>", "pad": "<|endoftext|>", "mask": "<|MASK|>", "eot": "<|im_end|>"},
        CHATML_TEMPLATE),
    "llama": TinyFamily(
        "llama", ("<|begin_of_text|>", "<|end_of_text|>") + _LLAMA3_SPECIALS,
        {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "eot": "<|eot_id|>"},
        LLAMA3_TEMPLATE, split=LLAMA3_SPLIT, bos_post_processor=True),
    "qwen2": TinyFamily(
        "qwen2", _CHATML_SPECIALS,
        {"eos": "<|im_end|>", "pad": "<|endoftext|>", "eot": "<|im_end|>"}, CHATML_SYSTEM_TEMPLATE),
    "qwen3": TinyFamily(
        "qwen3", _CHATML_SPECIALS,
        {"eos": "<|im_end|>", "pad": "<|endoftext|>", "eot": "<|im_end|>"}, CHATML_TEMPLATE,
        tie_embeddings=True),
}


# ---------------------------------------------------------------- tokenizer

def _learn_merges(text: str, count: int) -> list[tuple[str, str]]:
    """Greedy byte-level BPE on ``text``; ties broken lexically so the result is reproducible."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = Counter(tuple(w) for w, _ in pre.pre_tokenize_str(text))
    merges: list[tuple[str, str]] = []
    for _ in range(count):
        pairs: Counter = Counter()
        for word, freq in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = Counter({_merge_word(w, best): f for w, f in words.items()})
    return merges


def _merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


@lru_cache(maxsize=1)
def _base_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = _learn_merges(_CORPUS, _NUM_MERGES)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab, tuple(merges)


def special_ids(family: str) -> dict[str, int]:
    """Token string -> id for the family's special tokens."""
    start = len(_base_vocab()[0])
    return {tok: start + i for i, tok in enumerate(FAMILIES[family].specials)}


def role_ids(family: str) -> dict[str, int]:
    """bos/eos/pad/mask/eot -> id (roles the family lacks are absent)."""
    ids = special_ids(family)
    return {role: ids[tok] for role, tok in FAMILIES[family].roles.items()}


def build_tokenizer(family: str) -> Tokenizer:
    vocab, merges = _base_vocab()
    fam = FAMILIES[family]
    tok = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges)))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(fam.split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in fam.specials])
    if fam.bos_post_processor:
        bos = fam.roles["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, special_ids(family)[bos])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def write_tokenizer(family: str, directory: Path, fmt: str = "json") -> None:
    """``fmt="json"``: tokenizer.json. ``fmt="vocab_merges"``: vocab.json + merges.txt with the
    special tokens only in tokenizer_config.json (Dream's layout; Qwen2-style families only)."""
    if fmt == "json":
        build_tokenizer(family).save(str(directory / "tokenizer.json"))
        return
    if fmt != "vocab_merges" or FAMILIES[family].split != QWEN2_SPLIT:
        raise ValueError(f"tokenizer format {fmt!r} is not available for {family}")
    vocab, merges = _base_vocab()
    _write_json(directory / "vocab.json", vocab)
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _tokenizer_config(family: str) -> dict:
    fam = FAMILIES[family]
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True} for t, i in special_ids(family).items()}
    return {
        "added_tokens_decoder": decoder,
        "bos_token": fam.roles.get("bos"),
        "eos_token": fam.roles["eos"],
        "pad_token": fam.roles.get("pad"),
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": fam.chat_template,
        **fam.extra_tokenizer_config,
    }


# ---------------------------------------------------------------- configs

def _llada_config(r: dict[str, int]) -> dict:
    return {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu",
        "alibi": False, "alibi_bias_max": 8.0, "attention_dropout": 0.0, "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True, "bias_for_layer_norm": False, "block_group_size": 1,
        "block_type": "llama", "d_model": 64, "embedding_dropout": 0.0, "embedding_size": TINY_VOCAB,
        "eos_token_id": r["eos"], "flash_attention": False, "include_bias": False,
        "include_qkv_bias": False, "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02,
        "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
        "mask_token_id": r["mask"], "max_sequence_length": 256, "mlp_hidden_size": 128, "mlp_ratio": 2,
        "multi_query_attention": None, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2,
        "pad_token_id": r["pad"], "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-5,
        "rope": True, "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False,
        "torch_dtype": "float32", "use_cache": False, "vocab_size": TINY_VOCAB, "weight_tying": False,
    }


def _qwen_like_config(**fields) -> dict:
    return {
        "attention_dropout": 0.0, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
        "intermediate_size": 128, "max_position_embeddings": 256, "num_attention_heads": 4,
        "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_scaling": None,
        "rope_theta": 1000000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
        "use_cache": True, "vocab_size": TINY_VOCAB, **fields,
    }


def _config(family: str) -> dict:
    r, ids = role_ids(family), special_ids(family)
    if family == "llada":
        return _llada_config(r)
    if family == "dream":
        eot = ids["<|endoftext|>"]
        return _qwen_like_config(architectures=["DreamModel"], model_type="Dream", bos_token_id=eot,
                                 eos_token_id=eot, pad_token_id=eot, mask_token_id=r["mask"],
                                 max_window_layers=2, sliding_window=None, use_sliding_window=False)
    if family == "sdar":
        eot = ids["<|endoftext|>"]
        return _qwen_like_config(architectures=["SDARForCausalLM"], model_type="sdar", bos_token_id=eot,
                                 eos_token_id=eot, block_size=4, mask_token_id=r["mask"], head_dim=16,
                                 attention_bias=False, use_cache=False)
    if family == "llama":
        return _qwen_like_config(architectures=["LlamaForCausalLM"], model_type="llama",
                                 bos_token_id=r["bos"], eos_token_id=ids["<|end_of_text|>"], head_dim=16,
                                 attention_bias=False, mlp_bias=False, rms_norm_eps=1e-5,
                                 rope_theta=500000.0, pretraining_tp=1)
    eot = ids["<|endoftext|>"]
    fields = {"architectures": [f"{family.capitalize()}ForCausalLM"], "model_type": family,
              "bos_token_id": eot, "eos_token_id": r["eos"],
              "tie_word_embeddings": FAMILIES[family].tie_embeddings}
    if family == "qwen3":
        fields.update(head_dim=16, attention_bias=False)
    return _qwen_like_config(**fields)


def _generation_config(family: str, config: dict) -> dict:
    r, ids = role_ids(family), special_ids(family)
    if family == "llada":
        return {"_from_model_config": True, "eos_token_id": config["eos_token_id"],
                "pad_token_id": config["pad_token_id"], "use_cache": False}
    if family == "dream":
        return {"_from_model_config": True, "alg": "origin", "alg_temp": None, "bos_token_id": config["bos_token_id"],
                "eos_token_id": config["eos_token_id"], "eps": 0.001, "mask_token_id": None,
                "pad_token_id": config["pad_token_id"], "steps": 512, "temperature": 0.0,
                "top_k": None, "top_p": None}
    if family == "llama":
        return {"bos_token_id": r["bos"], "eos_token_id": [ids["<|end_of_text|>"], r["eot"]],
                "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    return {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [r["eot"], ids["<|endoftext|>"]],
            "pad_token_id": ids["<|endoftext|>"], "do_sample": True, "temperature": 0.7, "top_p": 0.8}


def tiny_config(family: str, **overrides) -> dict:
    """The family's config.json for a tiny model; ``overrides`` use the family's own field names."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; known: {sorted(FAMILIES)}")
    return {**_config(family), **overrides}


# ---------------------------------------------------------------- weights

def expected_spec(family: str, config: dict) -> ModelSpec:
    """The spec the loader must produce: config.json completed with the tokenizer's special
    tokens (bos, end-of-turn) and generation_config's eos list."""
    spec = spec_from_config(config)
    r = role_ids(family)
    gen = _generation_config(family, config).get("eos_token_id")
    gen_ids = tuple(gen) if isinstance(gen, list) else (() if gen is None else (gen,))
    extra = gen_ids + (r["eos"],) + ((r["eot"],) if "eot" in r else ())
    return replace(spec, eos_ids=tuple(dict.fromkeys(spec.eos_ids + extra)),
                   bos_id=spec.bos_id if spec.bos_id is not None else r.get("bos"),
                   pad_id=spec.pad_id if spec.pad_id is not None else r.get("pad"))


@torch.no_grad()
def _randomize(model: DecoderLM, seed: int) -> None:
    """Weights large enough that logits differ clearly between positions (std 1/sqrt(fan_in))."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith(".bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        elif "embed_tokens" in name:
            # A tied head reads logits off the embedding: scale it like a projection then.
            scale = p.shape[-1] ** -0.5 if model.spec.arch.tie_embeddings else 1.0
            p.copy_(scale * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def make_tiny_model(family: str, *, seed: int = 0, dtype: str = "float32",
                    **config_overrides) -> tuple[DecoderLM, ModelSpec]:
    """A random model in eval mode and its spec, without touching the disk."""
    spec = expected_spec(family, tiny_config(family, **config_overrides))
    model = DecoderLM(spec)
    _randomize(model, seed)
    return model.to(getattr(torch, dtype)).eval(), spec


def hf_tensor_names(family: str, num_layers: int, tied: bool) -> dict[str, str]:
    """Checkpoint tensor name -> our parameter name, written out per family (independently of
    the registry's renamer, so the loader's renaming is really tested)."""
    if family != "llada":
        return {}  # Llama/Qwen layouts use our names unchanged
    names = {"model.transformer.wte.weight": "model.embed_tokens.weight",
             "model.transformer.ln_f.weight": "model.norm.weight"}
    if not tied:
        names["model.transformer.ff_out.weight"] = "lm_head.weight"
    ours = {"attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm",
            "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
            "attn_out": "self_attn.o_proj", "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
            "ff_out": "mlp.down_proj"}
    for i in range(num_layers):
        for theirs, mine in ours.items():
            names[f"model.transformer.blocks.{i}.{theirs}.weight"] = f"model.layers.{i}.{mine}.weight"
    return names


def checkpoint_tensors(family: str, model: DecoderLM) -> dict[str, torch.Tensor]:
    """Our state dict under the family's checkpoint names (tied heads omitted, as HF saves them)."""
    state = model.state_dict()
    tied = model.spec.arch.tie_embeddings
    if tied:
        state.pop("lm_head.weight")
    mapping = hf_tensor_names(family, model.spec.arch.num_layers, tied)
    if not mapping:
        return {k: v.contiguous() for k, v in state.items()}
    if sorted(mapping.values()) != sorted(state):
        raise RuntimeError("hf_tensor_names is out of date with DecoderLM's parameters")
    return {theirs: state[mine].contiguous() for theirs, mine in mapping.items()}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_tiny_checkpoint(directory: str | Path, family: str, *, shards: int = 1, dtype: str = "float32",
                         seed: int = 0, tokenizer_format: str = "json", **config_overrides) -> Path:
    """Write a complete tiny HF-style checkpoint directory for ``family`` and return its path.

    ``tokenizer_format="vocab_merges"`` writes Dream's vocab.json + merges.txt instead of
    tokenizer.json (ChatML families only)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_config(family, **config_overrides)
    config["torch_dtype"] = dtype
    model, _ = make_tiny_model(family, seed=seed, dtype=dtype, **config_overrides)
    write_safetensors(checkpoint_tensors(family, model), directory, shards)
    _write_json(directory / "config.json", config)
    _write_json(directory / "generation_config.json", _generation_config(family, config))
    write_tokenizer(family, directory, tokenizer_format)
    tok_config = _tokenizer_config(family)
    if tokenizer_format == "vocab_merges":
        tok_config["tokenizer_class"] = "Qwen2Tokenizer"
    _write_json(directory / "tokenizer_config.json", tok_config)
    return directory
