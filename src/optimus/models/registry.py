"""Turns a checkpoint's ``config.json`` into a :class:`ModelSpec` and maps its tensor names.

Each family is a small :class:`Family` object registered by ``model_type``. Adding a family
(LLaDA2.0 later) means adding one entry here, not touching the engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from optimus.models.spec import ArchConfig, AttentionKind, ModelSpec


class ConfigError(ValueError):
    """A checkpoint's config is missing a field, names an unknown architecture, or is out of range."""


def _get(cfg: dict, *names: str, default=None, required: bool = True):
    for n in names:
        if n in cfg and cfg[n] is not None:
            return cfg[n]
    if default is not None or not required:
        return default
    raise ConfigError(f"config.json is missing field {names[0]!r}")


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def _qwen_arch(cfg: dict, qk_norm: bool, qkv_bias: bool) -> ArchConfig:
    heads = _get(cfg, "num_attention_heads")
    hidden = _get(cfg, "hidden_size")
    return ArchConfig(
        vocab_size=_get(cfg, "vocab_size"),
        hidden_size=hidden,
        num_layers=_get(cfg, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=_get(cfg, "num_key_value_heads", default=heads),
        head_dim=_get(cfg, "head_dim", default=hidden // heads),
        intermediate_size=_get(cfg, "intermediate_size"),
        rope_theta=float(_rope_theta(cfg)),
        rms_eps=float(_get(cfg, "rms_norm_eps", default=1e-6)),
        qkv_bias=bool(_get(cfg, "attention_bias", default=qkv_bias)),
        qk_norm=qk_norm,
        tie_embeddings=bool(_get(cfg, "tie_word_embeddings", default=False, required=False)),
        max_position=_get(cfg, "max_position_embeddings", default=4096),
    )


def _rope_theta(cfg: dict) -> float:
    if "rope_theta" in cfg:
        return cfg["rope_theta"]
    params = cfg.get("rope_parameters") or {}
    return params.get("rope_theta", 10000.0)


_LLADA_RENAMES = [
    (r"^model\.transformer\.wte\.weight$", "model.embed_tokens.weight"),
    (r"^model\.transformer\.ln_f\.weight$", "model.norm.weight"),
    (r"^model\.transformer\.ff_out\.weight$", "lm_head.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.attn_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.ff_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.(q|k|v)_proj\.weight$", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.attn_out\.weight$", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.ff_proj\.weight$", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.up_proj\.weight$", r"model.layers.\1.mlp.up_proj.weight"),
    (r"^model\.transformer\.blocks\.(\d+)\.ff_out\.weight$", r"model.layers.\1.mlp.down_proj.weight"),
]
_LLADA_COMPILED = [(re.compile(p), r) for p, r in _LLADA_RENAMES]


def llada_rename(name: str) -> str | None:
    for pattern, repl in _LLADA_COMPILED:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return None


def identity_rename(name: str) -> str | None:
    return name


def _llada_spec(cfg: dict) -> ModelSpec:
    heads = _get(cfg, "n_heads")
    d = _get(cfg, "d_model")
    arch = ArchConfig(
        vocab_size=_get(cfg, "embedding_size", "vocab_size"),
        hidden_size=d,
        num_layers=_get(cfg, "n_layers"),
        num_heads=heads,
        num_kv_heads=_get(cfg, "n_kv_heads", default=heads),
        head_dim=d // heads,
        intermediate_size=_get(cfg, "mlp_hidden_size"),
        rope_theta=float(_get(cfg, "rope_theta", default=10000.0)),
        rms_eps=float(_get(cfg, "rms_norm_eps", default=1e-5)),
        qkv_bias=bool(_get(cfg, "include_qkv_bias", "include_bias", default=False, required=False)),
        tie_embeddings=bool(_get(cfg, "weight_tying", default=False, required=False)),
        max_position=_get(cfg, "max_sequence_length", default=4096),
    )
    eos = _get(cfg, "eos_token_id", default=126081)
    eot = cfg.get("eot_token_id", 126348)
    return ModelSpec("llada", arch, AttentionKind.FULL, logit_shift=False,
                     mask_id=_get(cfg, "mask_token_id", default=126336),
                     eos_ids=tuple(dict.fromkeys(_ids(eos) + _ids(eot))),
                     pad_id=cfg.get("pad_token_id", eos), bos_id=cfg.get("bos_token_id", 126080),
                     block_size=cfg.get("block_size"))


def _dream_spec(cfg: dict) -> ModelSpec:
    eos = _get(cfg, "eos_token_id", default=151643)
    return ModelSpec("dream", _qwen_arch(cfg, qk_norm=False, qkv_bias=True), AttentionKind.FULL,
                     logit_shift=True, mask_id=_get(cfg, "mask_token_id", default=151666),
                     eos_ids=_ids(eos), pad_id=cfg.get("pad_token_id", eos), bos_id=cfg.get("bos_token_id"))


def _sdar_spec(cfg: dict) -> ModelSpec:
    block = _get(cfg, "block_size", default=4)
    if block <= 0:
        raise ConfigError(f"config field block_size={block} must be positive")
    eos = _get(cfg, "eos_token_id", default=151645)
    extra = _ids(cfg.get("eot_token_id"))
    return ModelSpec("sdar", _qwen_arch(cfg, qk_norm=True, qkv_bias=False), AttentionKind.BLOCK_CAUSAL,
                     logit_shift=False, mask_id=_get(cfg, "mask_token_id", default=151669),
                     eos_ids=tuple(dict.fromkeys(_ids(eos) + extra)), pad_id=cfg.get("pad_token_id"),
                     bos_id=cfg.get("bos_token_id"), block_size=block)


def _causal_spec(family: str, qk_norm: bool, qkv_bias: bool) -> Callable[[dict], ModelSpec]:
    def build(cfg: dict) -> ModelSpec:
        return ModelSpec(family, _qwen_arch(cfg, qk_norm=qk_norm, qkv_bias=qkv_bias), AttentionKind.CAUSAL,
                         logit_shift=False, mask_id=None, eos_ids=_ids(cfg.get("eos_token_id")),
                         pad_id=cfg.get("pad_token_id"), bos_id=cfg.get("bos_token_id"))
    return build


@dataclass(frozen=True)
class Family:
    name: str
    build_spec: Callable[[dict], ModelSpec]
    rename: Callable[[str], str | None]  # checkpoint tensor name -> our parameter name


FAMILIES: dict[str, Family] = {
    "llada": Family("llada", _llada_spec, llada_rename),
    "dream": Family("dream", _dream_spec, identity_rename),
    "sdar": Family("sdar", _sdar_spec, identity_rename),
    "llama": Family("llama", _causal_spec("llama", False, False), identity_rename),
    "qwen2": Family("qwen2", _causal_spec("qwen2", False, True), identity_rename),
    "qwen3": Family("qwen3", _causal_spec("qwen3", True, False), identity_rename),
}


def family_for(cfg: dict) -> Family:
    model_type = str(cfg.get("model_type", "")).lower()
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    archs = " ".join(cfg.get("architectures") or []).lower()
    for key in ("llada", "dream", "sdar"):
        if key in archs:
            return FAMILIES[key]
    raise ConfigError(f"unknown architecture: model_type={cfg.get('model_type')!r}, "
                      f"architectures={cfg.get('architectures')!r}; known model types: {sorted(FAMILIES)}")


def spec_from_config(cfg: dict) -> ModelSpec:
    try:
        return family_for(cfg).build_spec(cfg)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid config.json: {exc}") from exc
