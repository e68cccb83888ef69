"""Turns a checkpoint's ``config.json`` into a :class:`ModelSpec` and maps its tensor names.

Each family is a small :class:`Family` object registered by ``model_type``. Adding a family
(LLaDA2.0 later) means adding one entry here, not touching the engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from dataclasses import replace

from optimus.models.spec import ArchConfig, AttentionKind, ModelSpec, MoEConfig


class ConfigError(ValueError):
    """A checkpoint's config is missing a field, names an unknown architecture, or is out of range."""


class UnknownArchitectureError(ConfigError):
    """config.json names a model_type / architecture no registered family handles."""


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


# (checkpoint name, our name); ``{n}`` stands for a layer index.
_LLADA_NAMES = [
    ("model.transformer.wte.weight", "model.embed_tokens.weight"),
    ("model.transformer.ln_f.weight", "model.norm.weight"),
    ("model.transformer.ff_out.weight", "lm_head.weight"),
    ("model.transformer.blocks.{n}.attn_norm.weight", "model.layers.{n}.input_layernorm.weight"),
    ("model.transformer.blocks.{n}.ff_norm.weight", "model.layers.{n}.post_attention_layernorm.weight"),
    ("model.transformer.blocks.{n}.q_proj.weight", "model.layers.{n}.self_attn.q_proj.weight"),
    ("model.transformer.blocks.{n}.k_proj.weight", "model.layers.{n}.self_attn.k_proj.weight"),
    ("model.transformer.blocks.{n}.v_proj.weight", "model.layers.{n}.self_attn.v_proj.weight"),
    ("model.transformer.blocks.{n}.attn_out.weight", "model.layers.{n}.self_attn.o_proj.weight"),
    ("model.transformer.blocks.{n}.ff_proj.weight", "model.layers.{n}.mlp.gate_proj.weight"),
    ("model.transformer.blocks.{n}.up_proj.weight", "model.layers.{n}.mlp.up_proj.weight"),
    ("model.transformer.blocks.{n}.ff_out.weight", "model.layers.{n}.mlp.down_proj.weight"),
]


class TemplateRenamer:
    """Maps names between two layouts given (source, target) templates with a ``{n}`` slot.

    Returns None for a name no template matches, so the loader can name the stray tensor.
    """

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._rules = [(re.compile("^" + re.escape(src).replace(r"\{n\}", r"(?P<n>\d+)") + "$"), dst)
                       for src, dst in pairs]

    def __call__(self, name: str) -> str | None:
        for pattern, target in self._rules:
            match = pattern.match(name)
            if match:
                return target.format(**match.groupdict())
        return None


llada_rename = TemplateRenamer(_LLADA_NAMES)
llada_export = TemplateRenamer([(ours, theirs) for theirs, ours in _LLADA_NAMES])


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
    # LLaDA's config names neither bos nor <|eot_id|>: the loader completes them from the tokenizer.
    eos = _get(cfg, "eos_token_id", default=126081)
    return ModelSpec("llada", arch, AttentionKind.FULL, logit_shift=False,
                     mask_id=_get(cfg, "mask_token_id", default=126336),
                     eos_ids=tuple(dict.fromkeys(_ids(eos) + _ids(cfg.get("eot_token_id")))),
                     pad_id=cfg.get("pad_token_id", eos), bos_id=cfg.get("bos_token_id"),
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
    # SDAR checkpoints are Qwen3 (q/k norms); one converted from a Llama base has none.
    qk_norm = bool(_get(cfg, "use_qk_norm", default=True))
    return ModelSpec("sdar", _qwen_arch(cfg, qk_norm=qk_norm, qkv_bias=False), AttentionKind.BLOCK_CAUSAL,
                     logit_shift=False, mask_id=_get(cfg, "mask_token_id", default=151669),
                     eos_ids=tuple(dict.fromkeys(_ids(eos) + extra)), pad_id=cfg.get("pad_token_id"),
                     bos_id=cfg.get("bos_token_id"), block_size=block)


def _qwen3_moe(cfg: dict) -> MoEConfig:
    """Qwen3-MoE: layer i is sparse unless listed in mlp_only_layers, and when
    (i + 1) % decoder_sparse_step == 0."""
    step = _get(cfg, "decoder_sparse_step", default=1)
    dense = set(cfg.get("mlp_only_layers") or [])
    layers = tuple(i for i in range(_get(cfg, "num_hidden_layers")) if i not in dense and (i + 1) % step == 0)
    return MoEConfig(num_experts=_get(cfg, "num_experts"), top_k=_get(cfg, "num_experts_per_tok"),
                     expert_size=_get(cfg, "moe_intermediate_size"), layers=layers,
                     norm_topk=bool(_get(cfg, "norm_topk_prob", default=False, required=False)))


def _sdar_moe_spec(cfg: dict) -> ModelSpec:
    spec = _sdar_spec(cfg)
    moe = _qwen3_moe(cfg)
    # The dense MLP size only matters for mlp_only_layers; all-sparse configs may leave it out.
    arch = replace(_qwen_arch({**cfg, "intermediate_size": cfg.get("intermediate_size") or moe.expert_size},
                              qk_norm=True, qkv_bias=False), moe=moe)
    return replace(spec, family="sdar_moe", arch=arch)


def _llada2_spec(cfg: dict) -> ModelSpec:
    """LLaDA2.0 (LLaDA2MoeModelLM). Its config names neither the mask id nor the block: the
    published generate() uses mask 156895 and block-causal attention over blocks of 32."""
    heads, hidden = _get(cfg, "num_attention_heads"), _get(cfg, "hidden_size")
    head_dim = _get(cfg, "head_dim", default=hidden // heads)
    layers = _get(cfg, "num_hidden_layers")
    first_dense = _get(cfg, "first_k_dense_replace", default=0, required=False)
    moe = MoEConfig(num_experts=_get(cfg, "num_experts"), top_k=_get(cfg, "num_experts_per_tok"),
                    expert_size=_get(cfg, "moe_intermediate_size"), layers=tuple(range(first_dense, layers)),
                    scoring=_get(cfg, "score_function", default="sigmoid"),
                    norm_topk=bool(_get(cfg, "norm_topk_prob", default=True)),
                    n_group=_get(cfg, "n_group", default=1), topk_group=_get(cfg, "topk_group", default=1),
                    scaling=float(_get(cfg, "routed_scaling_factor", default=1.0)),
                    expert_bias=bool(_get(cfg, "moe_router_enable_expert_bias", default=True)),
                    shared_size=_get(cfg, "moe_intermediate_size") * (cfg.get("num_shared_experts") or 0))
    arch = ArchConfig(
        vocab_size=_get(cfg, "vocab_size"), hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=_get(cfg, "num_key_value_heads", default=heads), head_dim=head_dim,
        intermediate_size=_get(cfg, "intermediate_size"), rope_theta=float(_rope_theta(cfg)),
        rms_eps=float(_get(cfg, "rms_norm_eps", default=1e-6)),
        qkv_bias=bool(_get(cfg, "use_qkv_bias", default=False, required=False)),
        qk_norm=bool(_get(cfg, "use_qk_norm", default=True)),
        tie_embeddings=bool(_get(cfg, "tie_word_embeddings", default=False, required=False)),
        max_position=_get(cfg, "max_position_embeddings", default=4096), moe=moe,
        rotary_dim=int(head_dim * float(_get(cfg, "partial_rotary_factor", default=1.0))))
    block = _get(cfg, "block_size", default=32)
    if block <= 0:
        raise ConfigError(f"config field block_size={block} must be positive")
    eos = _get(cfg, "eos_token_id", default=156892)
    return ModelSpec("llada2_moe", arch, AttentionKind.BLOCK_CAUSAL, logit_shift=False,
                     mask_id=_get(cfg, "mask_token_id", default=156895), eos_ids=_ids(eos),
                     pad_id=cfg.get("pad_token_id", eos), bos_id=cfg.get("bos_token_id"), block_size=block)


_LLADA2_NAMES = [("model.word_embeddings.weight", "model.embed_tokens.weight")]


def _with_fallback(renamer: "TemplateRenamer") -> Callable[[str], str | None]:
    """Rename the names the templates list; every other name is the same in both layouts."""
    def rename(name: str) -> str | None:
        return renamer(name) or name
    return rename


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
    export: Callable[[str], str | None] = identity_rename  # our parameter name -> checkpoint name


FAMILIES: dict[str, Family] = {
    "llada": Family("llada", _llada_spec, llada_rename, llada_export),
    "dream": Family("dream", _dream_spec, identity_rename),
    "sdar": Family("sdar", _sdar_spec, identity_rename),
    "sdar_moe": Family("sdar_moe", _sdar_moe_spec, identity_rename),
    "llada2_moe": Family("llada2_moe", _llada2_spec, _with_fallback(TemplateRenamer(_LLADA2_NAMES)),
                         _with_fallback(TemplateRenamer([(o, t) for t, o in _LLADA2_NAMES]))),
    "llama": Family("llama", _causal_spec("llama", False, False), identity_rename),
    "qwen2": Family("qwen2", _causal_spec("qwen2", False, True), identity_rename),
    "qwen3": Family("qwen3", _causal_spec("qwen3", True, False), identity_rename),
}


def family_for(cfg: dict) -> Family:
    model_type = str(cfg.get("model_type", "")).lower()
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    archs = " ".join(cfg.get("architectures") or []).lower()
    # Most specific first: "llada2moemodellm" also contains "llada", "sdarmoe..." "sdar".
    for key, family in (("llada2", "llada2_moe"), ("sdarmoe", "sdar_moe"), ("llada", "llada"),
                        ("dream", "dream"), ("sdar", "sdar")):
        if key in archs:
            return FAMILIES[family]
    raise UnknownArchitectureError(f"unknown architecture: model_type={cfg.get('model_type')!r}, "
                      f"architectures={cfg.get('architectures')!r}; known model types: {sorted(FAMILIES)}")


def check_token_ids(spec: ModelSpec) -> ModelSpec:
    """Every special id the spec names must index the embedding table."""
    vocab = spec.arch.vocab_size
    named = {"mask_token_id": spec.mask_id, "pad_token_id": spec.pad_id, "bos_token_id": spec.bos_id}
    named.update({f"eos_token_id[{i}]": t for i, t in enumerate(spec.eos_ids)})
    for name, token in named.items():
        if token is not None and not 0 <= token < vocab:
            raise ConfigError(f"config field {name}={token} is out of range for vocab_size={vocab}")
    return spec


def spec_from_config(cfg: dict) -> ModelSpec:
    try:
        return check_token_ids(family_for(cfg).build_spec(cfg))
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid config.json: {exc}") from exc
