"""Load a model into a native :class:`DecoderLM`: a Hugging Face directory or a GGUF file.

:func:`load_model` takes what ``--model`` takes; :mod:`optimus.models.sources` finds it on
this machine (fetching Hub ids and aliases first) and this module reads it. Only safetensors
(and GGUF, :mod:`optimus.models.gguf`) are read, never pickle, and no code of the model's runs. The module is built on the ``meta`` device and each
tensor is read straight to the target device and cast to the target dtype as it is read, so the
peak memory is the model in its final dtype plus one tensor: no full fp32 copy ever exists.
Every bad input raises a :class:`LoadError` subclass whose message names the problem.

``random:<shape>`` (and ``random-tiny:<shape>``) stand for no files: they build random
weights at a published shape (:mod:`optimus.models.shapes`) for benchmarks, see
:func:`load_random_model`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from optimus.models.errors import (  # noqa: F401  (re-exported: callers catch them from here)
    ConfigFieldError, CorruptFileError, LoadError, MissingFileError, MissingTensorError, ShapeMismatchError,
    UnexpectedTensorError, UnknownArchitectureError, UnknownShapeError, UnsafeFormatError,
)
from optimus.models.registry import ConfigError, Family, UnknownArchitectureError as _UnknownArch
from optimus.models.registry import check_token_ids, family_for, spec_from_config
from optimus.models.shapes import SHAPES, random_decoder, shape_config
from optimus.models.adapter import is_adapter_dir
from optimus.models.fp8 import fp8_values, keep_checkpoint_fp8
from optimus.models.sources import ModelSource, RandomModelName, SourceKind, local_directory, resolve_model
from optimus.models.spec import ModelSpec
from optimus.models.transformer import DecoderLM
from optimus.models.tokenizer import Tokenizer, TokenizerError


@dataclass(frozen=True)
class LoadedModel:
    model: DecoderLM  # eval mode, on its target device and dtype
    spec: ModelSpec  # config.json completed with the tokenizer's bos/eos/end-of-turn ids
    tokenizer: Tokenizer
    generation_config: dict
    path: Path


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Tensors some checkpoints carry that the model recomputes (old Llama exports).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


# ---------------------------------------------------------------- public API

# A tensor-parallel rank's view of a model: given the full spec, what to slice (parallel.sharding.Shard).
ShardFor = Callable[[ModelSpec], Any]


def load_model(path: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
               progress: bool = True, revision: str | None = None, shard: ShardFor | None = None,
               quantization: str | None = None) -> LoadedModel:
    """Load config, tokenizer, generation config and weights of the model ``path`` names.

    ``path`` is a local HF directory or ``.gguf`` file, a Hub id ``org/name`` (at ``revision``),
    an alias, ``default`` (the shipped model) or ``random:<shape>`` (:func:`load_random_model`);
    see :func:`~optimus.models.sources.resolve_model`. ``dtype="auto"`` is bf16 on CUDA and fp32
    on CPU; ``device="auto"`` is CUDA when available. ``shard`` (tensor parallelism) builds one
    rank's module and reads only its slice of each tensor; the spec stays the full model's.
    ``quantization="fp8"`` rounds every projection weight to FP8 (:mod:`optimus.models.fp8`).
    """
    if quantization not in (None, "none", "fp8"):
        raise LoadError(f"unknown quantization {quantization!r}; use fp8 (or leave it out)")
    loaded = _load(path, dtype, device, progress, revision, shard)
    if quantization == "fp8":
        from optimus.models.fp8 import quantize_model
        quantize_model(loaded.model)
    return loaded


def _load(path: str | Path, dtype, device, progress: bool, revision: str | None, shard: ShardFor | None) -> LoadedModel:
    source = resolve_model(path, revision, progress)
    if source.kind is SourceKind.RANDOM:
        return load_random_model(RandomModelName.parse(source.name), dtype, device, shard=shard)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if source.kind is SourceKind.GGUF:
        return _load_gguf(source, dtype, device, progress, shard)
    root = source.location
    if is_adapter_dir(root):
        return _load_adapter(source, dtype, device, progress, shard)
    config = _read_json(root / "config.json")
    family, spec = _spec_from_config(config)
    tokenizer = _tokenizer_from_dir(root)
    spec = complete_spec(spec, tokenizer)
    generation_config = _read_json(root / "generation_config.json", required=False)
    files = _weight_files(root)
    # An FP8 checkpoint's projections stay FP8 (one process: a shard's slices of block scales
    # need not fall on block boundaries, so a sharded model computes with the values in dtype).
    kept = {} if shard is None else None
    entries = fp8_values(config, files, _safetensors_entries(files, family, device, progress), _safe_device(device),
                         keep=kept)
    model = _build_model(spec, family, entries, dtype, device, shard and shard(spec))
    if kept:
        keep_checkpoint_fp8(model, kept)
    return LoadedModel(model, spec, tokenizer, generation_config, source.identity)


def _load_gguf(source: ModelSource, dtype: torch.dtype, device: torch.device, progress: bool,
               shard: ShardFor | None) -> LoadedModel:
    """A GGUF file: config, tokenizer and chat template from its metadata, weights dequantized
    tensor by tensor to ``dtype``."""
    family, config, tokenizer, entries = _gguf_parts(source.location, progress)
    _, spec = _spec_from_config(config, f"GGUF file {source.location}: ")
    spec = complete_spec(spec, tokenizer)
    model = _build_model(spec, family, entries, dtype, device, shard and shard(spec))
    return LoadedModel(model, spec, tokenizer, {}, source.identity)


def _gguf_parts(path: Path, progress: bool) -> tuple[Family, dict, Tokenizer, Iterator[TensorEntry]]:
    from optimus.models.gguf import GGUFFile
    from optimus.models.gguf_tokenizer import tokenizer_from_gguf

    file = GGUFFile(path)
    config = file.config()
    family, _ = _spec_from_config(config, f"GGUF file {file.path}: ")
    bar = tqdm(list(file.tensors()), desc="Dequantizing", unit="tensor", disable=not progress)
    entries = ((t.source, None if t.name is None else family.rename(t.name), t.shape, t.read) for t in bar)
    return family, config, tokenizer_from_gguf(file), entries


def _load_adapter(source: ModelSource, dtype: torch.dtype, device: torch.device, progress: bool,
                  shard: ShardFor | None) -> LoadedModel:
    """An adapter directory (:mod:`optimus.models.adapter`): its config.json over the base's
    tensors, each changed by the adapter as it is read; the base's tokenizer."""
    from optimus.models.adapter import AdapterWeights, read_adapter_config
    from optimus.models.sources import resolve_base
    root = source.location
    cfg = read_adapter_config(root)
    family, spec = _spec_from_config(_read_json(root / "config.json"))
    weights = AdapterWeights(root, cfg)
    base = resolve_base(cfg, progress)
    if base.is_dir():
        base_family, _ = _spec_from_config(_read_json(base / "config.json"))
        tokenizer = _tokenizer_from_dir(base)
        entries = _safetensors_entries(_weight_files(base), base_family, device, progress)
    else:
        _, _, tokenizer, entries = _gguf_parts(base, progress)
    spec = complete_spec(spec, tokenizer)
    generation_config = _read_json(root / "generation_config.json", required=False)
    model = _build_model(spec, family, weights.apply(entries), dtype, device, shard and shard(spec))
    return LoadedModel(model, spec, tokenizer, generation_config, source.identity)


def load_random_model(name: RandomModelName, dtype: str | torch.dtype = "auto",
                      device: str | torch.device = "auto", seed: int = 0,
                      shard: ShardFor | None = None) -> LoadedModel:
    """Random weights at ``name``'s shape, with the default model's tokenizer (the HTTP API
    needs one; every shape's vocabulary holds its ids, and its mask and end ids lie past them).

    Random confidences mean nothing: serve such a model with a replayed acceptance profile
    (``EngineConfig.replay_acceptance``). Greedy decoding proposes only ids the tokenizer shows
    as text (:func:`_propose_only_text`), so outputs run to ``max_tokens`` and stream text.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if name.shape not in SHAPES:
        raise UnknownShapeError(f"unknown model shape {name.shape!r} in {str(name)!r}; use random:SHAPE or "
                                f"random-tiny:SHAPE with SHAPE one of {', '.join(sorted(SHAPES))}")
    spec = spec_from_config(shape_config(name.shape, name.tiny))
    tokenizer = _tokenizer_from_dir(resolve_model_path("default"))
    _check_tokenizer_fits(spec, tokenizer, str(name))
    model = random_decoder(spec, device, dtype, seed)
    _propose_only_text(model, tokenizer)
    if shard is not None:  # every rank draws the whole model (same seed), then keeps its slices
        part = shard(spec)
        local = part.local_model()
        local.load_state_dict(part.state(model.state_dict()), strict=True, assign=True)
        model = local
    return LoadedModel(_finish(model, device), spec, tokenizer, {}, Path(str(name)))


def _check_tokenizer_fits(spec: ModelSpec, tokenizer: Tokenizer, name: str) -> None:
    """Every id the tokenizer gives must be a token of the model, and none may be the mask
    (a prompt token equal to the mask id would read as an uncommitted position)."""
    if tokenizer.vocab_size > spec.arch.vocab_size:
        raise ConfigFieldError(f"{name}: the tokenizer has {tokenizer.vocab_size} ids, more than the model's "
                               f"vocabulary of {spec.arch.vocab_size}")
    if spec.mask_id is not None and spec.mask_id < tokenizer.vocab_size:
        raise ConfigFieldError(f"{name}: mask id {spec.mask_id} is a token of the tokenizer")


@torch.no_grad()
def _propose_only_text(model: DecoderLM, tokenizer: Tokenizer) -> None:
    """Zero the LM-head rows of every id the tokenizer cannot show as text: ids past its
    vocabulary and its special tokens. Their logits are then exactly 0, below the largest of
    thousands of random logits, so greedy decoding never proposes them: every committed token
    streams text (benchmark clients time text frames, not tokens) and no end token ever comes.
    The head keeps its full size, so a step costs what it costs the real model. Sampled
    requests can still draw such ids; they decode to nothing. (A tied head would zero those
    ids' input embeddings too: harmless, the mask is the only one of them ever fed.)"""
    head = model.lm_head.weight
    head[tokenizer.vocab_size:] = 0
    head[list(tokenizer.all_special_ids)] = 0


def resolve_model_path(path: str | Path) -> Path:
    """A local model directory (``default``: the shipped one); nothing is fetched."""
    return local_directory(path)


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise LoadError(f"unknown dtype {dtype!r}; use auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def complete_spec(spec: ModelSpec, tokenizer: Tokenizer) -> ModelSpec:
    """Add what config.json leaves to the tokenizer: generation_config's eos list, the
    tokenizer's eos and end-of-turn tokens, and bos/pad when the config names none."""
    extra = tokenizer.eos_token_ids + ((tokenizer.end_of_turn_id,) if tokenizer.end_of_turn_id is not None else ())
    spec = replace(spec, eos_ids=tuple(dict.fromkeys(spec.eos_ids + extra)),
                   bos_id=spec.bos_id if spec.bos_id is not None else tokenizer.bos_token_id,
                   pad_id=spec.pad_id if spec.pad_id is not None else tokenizer.pad_token_id)
    try:
        return check_token_ids(spec)
    except ConfigError as exc:
        raise ConfigFieldError(f"{exc} (after adding the tokenizer's special tokens)") from exc


# ---------------------------------------------------------------- config, tokenizer, files

def _read_json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise MissingFileError(f"missing file: {path.name} in {path.parent}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LoadError(f"{path.name} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise LoadError(f"{path.name} must hold a JSON object")
    return data


def _spec_from_config(config: dict, where: str = "") -> tuple[Family, ModelSpec]:
    try:
        return family_for(config), spec_from_config(config)
    except _UnknownArch as exc:
        raise UnknownArchitectureError(f"{where}{exc}") from exc
    except ConfigError as exc:
        raise ConfigFieldError(f"{where}{exc}") from exc


def _tokenizer_from_dir(root: Path) -> Tokenizer:
    slow_files = (root / "vocab.json").is_file() and (root / "merges.txt").is_file()
    if not (root / "tokenizer.json").is_file() and not slow_files:
        raise MissingFileError(f"missing file: tokenizer.json (nor vocab.json + merges.txt) in {root}")
    try:
        return Tokenizer.from_dir(root)
    except TokenizerError as exc:
        raise LoadError(str(exc)) from exc


def _weight_files(root: Path) -> list[Path]:
    """The safetensors files to read: the index's shards, else model.safetensors, else any."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LoadError(f"{index.name} has no weight_map")
        files = [root / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeFormatError(f"refusing pickle weights {pickles} in {root}: only *.safetensors are "
                                    "loaded (pickle can run arbitrary code); convert the checkpoint first")
        raise MissingFileError(f"missing file: no *.safetensors weights in {root}")
    for f in files:
        if not f.is_file():
            raise MissingFileError(f"missing file: {f.name} (named by model.safetensors.index.json) in {root}")
    return files


# ---------------------------------------------------------------- weights

def _safe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return str(device)


def _corrupt(f: Path, exc: Exception) -> CorruptFileError:
    return CorruptFileError(f"corrupt weight file {f}: not readable as safetensors ({exc})")


# (checkpoint name, our name or None, shape, read): nothing is read until ``read()`` is called,
# so names and shapes are checked before any tensor is loaded.
TensorEntry = tuple[str, "str | None", tuple[int, ...], Callable[[], torch.Tensor]]


def _safetensors_entries(files: list[Path], family: Family, device: torch.device,
                         progress: bool) -> Iterator[TensorEntry]:
    """One entry per stored tensor; its ``read`` is valid until the next entry is drawn."""
    bar = tqdm(files, desc="Loading weights", unit="shard", disable=not progress or len(files) < 2)
    for f in bar:
        if f.stat().st_size < 8:  # not even the header's length
            raise CorruptFileError(f"corrupt weight file {f}: {f.stat().st_size} bytes, too short for safetensors")
        try:
            with safe_open(str(f), framework="pt", device=_safe_device(device)) as handle:
                entries = [(name, tuple(handle.get_slice(name).get_shape())) for name in handle.keys()]
                for name, shape in entries:
                    yield name, family.rename(name), shape, _reader(handle, name, f)
        except (SafetensorError, OSError) as exc:
            raise _corrupt(f, exc) from exc


def _reader(handle: Any, name: str, f: Path) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise _corrupt(f, exc) from exc
    return read


def _build_model(spec: ModelSpec, family: Family, entries: Iterator[TensorEntry], dtype: torch.dtype,
                 device: torch.device, shard=None) -> DecoderLM:
    """``shard`` (a parallel.sharding.Shard): build its module, keep its slice of each tensor."""
    with torch.device("meta"):
        model = DecoderLM(spec)
    expected = {n: tuple(p.shape) for n, p in model.state_dict().items()}  # the checkpoint's shapes
    if shard is not None:
        model = shard.local_model()
    tied = spec.arch.tie_embeddings
    if tied:
        expected.pop("lm_head.weight")  # shares the embedding; HF omits it or repeats it
    state: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    for name, ours, shape, read in entries:
        if name.endswith(_IGNORED_SUFFIXES) or (tied and ours == "lm_head.weight"):
            continue
        if ours is None or ours not in expected:
            raise UnexpectedTensorError(f"unexpected tensor {name!r} in checkpoint: no such weight in a "
                                        f"{spec.family} model")
        if ours in seen:
            raise UnexpectedTensorError(f"tensor {name!r} appears twice in the checkpoint")
        if shape != expected[ours]:
            raise ShapeMismatchError(f"tensor {name!r} has shape {list(shape)}, expected "
                                     f"{list(expected[ours])} from config.json")
        seen.add(ours)
        if shard is not None and not shard.holds(ours):
            continue  # another rank's expert: never read
        tensor = read()
        if not tensor.is_floating_point():
            raise LoadError(f"tensor {name!r} has dtype {tensor.dtype}; weights must be floating point")
        if shard is not None:  # a copy: a view would keep the whole tensor alive
            tensor = shard.slice(ours, tensor).to(device=device, dtype=dtype, copy=True)
        state[ours] = tensor.to(device=device, dtype=dtype)  # per tensor: never a whole-model fp32 copy
    missing = sorted(set(expected) - seen)
    if missing:
        shown = ", ".join(repr(family.export(n) or n) for n in missing[:5])
        raise MissingTensorError(f"checkpoint is missing {len(missing)} tensor(s): {shown}"
                                 + (" ..." if len(missing) > 5 else ""))
    if tied:
        embed = state["model.embed_tokens.weight"]
        state["lm_head.weight"] = embed if shard is None else shard.slice("lm_head.weight", embed).clone()
    model.load_state_dict(state, strict=True, assign=True)
    return _finish(model, device)


def _finish(model: DecoderLM, device: torch.device) -> DecoderLM:
    if model.spec.arch.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True replaced both objects
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != device.type]
    if left:
        raise RuntimeError(f"tensors left off {device} after loading: {left[:5]}")
    return model.eval()
