"""One frozen config tree. The CLI is generated from it: every leaf field is a flag
(``page_size`` -> ``--page-size``), documented by the ``help`` in its field metadata."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from dataclasses import dataclass, field


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class ModelConfig:
    model: str = _opt("auto", "HF model directory, .gguf file, Hugging Face Hub id org/name (downloaded "
                              "once into the Hub cache), alias (smollm2-135m), 'default' for the shipped 22M "
                              "tasks model, 'auto' for the shipped chat dLLM when its base is at hand (else "
                              "'default'), or random:SHAPE / random-tiny:SHAPE for random weights at a "
                              "published shape (benchmarks only)")
    revision: str | None = _opt(None, "Hub branch, tag or commit of a Hub --model (default: main)")
    dtype: str = _opt("auto", "auto | bfloat16 | float16 | float32 (auto: bf16 on GPU, fp32 on CPU)")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N")
    quantization: str | None = _opt(None, "fp8: keep every projection weight in FP8 e4m3, one scale per output "
                                          "channel, quantized at load: half the weight memory; on CUDA an FP8 "
                                          "kernel reads them (faster than bf16 only in small steps: docs/models.md). "
                                          "FP8 checkpoints load without it",
                                    choices=("fp8",))


@dataclass(frozen=True)
class CacheConfig:
    page_size: int = _opt(16, "KV-cache page size in tokens")
    memory_fraction: float = _opt(0.85, "fraction of free device memory the KV cache may take")
    num_pages: int | None = _opt(None, "fixed number of KV pages (overrides memory_fraction)")


@dataclass(frozen=True)
class SchedulerConfig:
    policy: str = _opt("elastic", "chunk policy: ar | fixed:C | elastic")
    block_size: int | None = _opt(None, "denoising block; defaults to the model's (32 if it has none)")
    max_running: int = _opt(256, "most requests decoding at once")
    max_waiting: int = _opt(1024, "most requests queued; more are refused")
    max_tokens_per_step: int = _opt(4096, "token budget of one step (prefill pieces + chunks)")
    prefill_chunk: int = _opt(512, "most prompt tokens one request prefills in a step")
    cache_mode: str = _opt("auto", "full-attention models (LLaDA, Dream): dual-cache | prefix-cache (Fast-dLLM's, "
                                   "refreshed at each block start) | prefix-block (no refresh; each block sees "
                                   "only what precedes it: an approximation); auto = dual-cache. Causal and "
                                   "block-causal models are cached exactly and take auto or prefix-block")
    suffix_window: int = _opt(0, "prefix-block on full-attention models: mask positions after the chunk, "
                                 "computed but not stored")
    refresh_wave_wait: int = _opt(2, "dual and prefix cache: steps a due refresh may wait for others about to be "
                                     "due, to share a step with them (0: refresh at once)")
    refresh_wave_min_decoders: int = _opt(64, "dual and prefix cache: refreshes wait for a wave only in steps "
                                              "of this many decoders or more")
    elastic_per_request: bool = _opt(True, "elastic: plan each request on its own measured confidence level "
                                           "(off: one shared tau curve for every request)")


GRAPH_CAPTURE_RULES = ("decode", "all")


@dataclass(frozen=True)
class RunnerConfig:
    cuda_graphs: bool = _opt(True, "replay decoding steps from CUDA graphs (GPU only)")
    graph_max_tokens: int = _opt(512, "largest step (in tokens) served from a CUDA graph; larger steps run "
                                      "eagerly (their GPU time hides the launches, and they are not padded "
                                      "to a power-of-two bucket)")
    attention_backend: str = _opt("auto", "auto | torch | triton")
    overlap: bool = _opt(True, "greedy steps whose commits are certain (a causal model's; a diffusion step "
                               "whose every window has one masked position left, prefix-block cache): launch the "
                               "next step before reading their tokens (they feed it on the device), hiding host "
                               "work behind the GPU")
    pipeline: str = _opt("off", "diffusion greedy decoding on a GPU: running requests take turns in two halves, "
                                "each half's step launched before the other half's is read, so planning and "
                                "commits hide behind the GPU. off | auto (when the device's latency curve says two "
                                "half steps beat a whole step plus the host's time) | N (from N running requests on)")
    graph_precapture: bool = _opt(False, "capture the CUDA graph of every decoding bucket at start-up (~10 s "
                                         "more at 8B and a cold Triton cache's compiles) instead of on first "
                                         "use, so no step stalls on a capture while serving or timing")
    graph_capture: str = _opt("decode", "which steps capture a CUDA graph for a bucket met the first time: decode "
                                        "(steps without a prompt piece; one carrying a prompt replays a captured "
                                        "bucket or runs eagerly, so arrivals mixing prompts into decoding steps "
                                        "cause no captures while serving) | all (also steps carrying a prompt)",
                              choices=GRAPH_CAPTURE_RULES)

    def __post_init__(self) -> None:
        check_pipeline(self.pipeline)
        if self.graph_capture not in GRAPH_CAPTURE_RULES:
            expected = ", ".join(GRAPH_CAPTURE_RULES)
            raise ValueError(f"graph_capture: expected one of {expected}, got {self.graph_capture!r}")


def check_pipeline(text: str) -> None:
    """``runner.pipeline``: off, auto, or a number of running requests >= 1."""
    if text not in ("off", "auto") and not (text.isdigit() and int(text) >= 1):
        raise ValueError(f"pipeline: expected off, auto or a number of running requests >= 1, got {text!r}")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel: int = _opt(1, "processes (one per GPU) one engine's model is sharded over: attention heads, "
                                   "MLP and expert columns, KV pages by head, the vocabulary of the LM head")
    expert_parallel: bool = _opt(False, "tensor parallel MoE models: place each rank's share of the routed "
                                        "experts whole (expert parallelism) instead of slicing every expert")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    profile_path: str | None = _opt(None, "latency profile JSON (default: per device and model in ~/.cache/optimus)")
    seed: int = _opt(0, "engine seed for requests that give none")
    likelihood_samples: int = _opt(32, "diffusion models: Monte Carlo samples per sequence of a likelihood "
                                       "estimate (echo/logprobs on /v1/completions); causal models are exact")
    acceptance_profile: str | None = _opt(None, "tau-per-chunk JSON (optimus eval) seeding the elastic policy")
    replay_acceptance: str | None = _opt(
        None, "benchmarks only: commit per step as many positions (most confident first) as this measured "
              "acceptance profile (bench acceptance JSON) says a chunk of that size commits, instead of the "
              "requests' decoding rule; for random-weight models, whose confidences mean nothing. Also seeds "
              "elastic's tau prior unless --acceptance-profile is given")
    emulate_device: str | None = _opt(
        None, "benchmarks only: run no forward; each step takes the time this latency profile JSON predicts and "
              "picks random tokens (an emulated device), so any machine serves at that card's pace. Pair with "
              "--replay-acceptance, a random-tiny model of the shape and greedy requests")


@dataclass(frozen=True)
class ServerConfig:
    host: str = _opt("127.0.0.1", "address to bind")
    port: int = _opt(8000, "port to bind")
    api_key: str | None = _opt(None, "require 'Authorization: Bearer KEY'")
    allowed_hosts: tuple[str, ...] = _opt(
        (), "Host names answered besides localhost, 127.0.0.1 and [::1] (any port; '.example.com' also "
            "matches subdomains; '*' turns the Host check off). The check is on when bound to loopback "
            "or when this is given")
    allowed_origins: tuple[str, ...] = _opt(
        (), "origins (scheme://host[:port]) whose pages may call the server, besides those of the "
            "allowed hosts; '*' allows any")
    served_model_name: str | None = _opt(None, "model id reported by /v1/models (default: directory name)")
    max_n: int = _opt(8, "cap on the 'n' field")
    max_tokens_cap: int | None = _opt(None, "cap on max_tokens (default: the model's context length)")
    max_call_tokens: int = _opt(65536, "most tokens one API call may ask to generate (prompts x n x "
                                       "max_tokens); a larger ask is a 400, an omitted max_tokens shrinks to fit")
    max_body_bytes: int = _opt(1 << 20, "largest request body accepted")
    shutdown_timeout: float = _opt(30.0, "seconds to drain on SIGTERM before aborting")
    watchdog_timeout: float = _opt(60.0, "seconds a step may take before the engine is marked dead")
    engine_process: bool = _opt(True, "run the engine's step loop in its own process, apart from the HTTP "
                                      "front-ends (off: a thread of the one server process)")
    front_ends: int | None = _opt(None, "HTTP front-end processes sharing the port, with --engine-process "
                                        "(default: one per four CPU cores, one to four)")
    engine_restarts: int = _opt(2, "times a dead engine process is started again, its queued requests kept, "
                                   "before the server exits with status 1")
    replicas: int = _opt(1, "engines behind one OpenAI-compatible ingress, as Ray Serve deployments (a local "
                            "Ray instance, or the cluster RAY_ADDRESS names); each may be --tensor-parallel")
    stream_interval: int = _opt(1, "tokens per SSE event: a stream's event waits until its answer grew by this "
                                   "many tokens or finished (1: every step's commit, which for a diffusion step "
                                   "can be several tokens)")


def _leaf_fields(cls) -> list[tuple[str, dataclasses.Field, typing.Any]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out.extend(_leaf_fields(t))
        else:
            out.append((f.name, f, t))
    return out


def _item_type(t):
    """``tuple[X, ...]`` (a list flag) -> X; None for any other type."""
    args = typing.get_args(t)
    return args[0] if typing.get_origin(t) is tuple and len(args) == 2 and args[1] is Ellipsis else None


def _list_value(values, item_type) -> tuple:
    """A list flag takes space- or comma-separated items and may be repeated:
    ``--x a b,c --x d`` -> ('a', 'b', 'c', 'd'). A tuple, so the config stays hashable."""
    return tuple(item_type(part.strip()) for value in values for part in str(value).split(",") if part.strip())


def _scalar_type(t):
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if args else t


def add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    group = parser.add_argument_group(cls.__name__)
    for name, f, t in _leaf_fields(cls):
        flag = "--" + name.replace("_", "-")
        typ = _scalar_type(t)
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        if _item_type(t) is not None:  # default None: config_from_args then keeps the field's default
            group.add_argument(flag, nargs="+", action="extend", default=None,
                               metavar=name.upper().removesuffix("S"),
                               help=f"{help_text} (space- or comma-separated, repeatable; default: none)")
        elif typ is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                               help=_with_default(help_text, "on" if default else "off"))
        else:
            group.add_argument(flag, type=typ, default=default, choices=f.metadata.get("choices"),
                               help=_with_default(help_text, "none" if default is None else str(default)))


# A help text that already says its default ("defaults to the model's", "(default: directory
# name)") says it better than the raw value; 'default' in quotes is a value, not the default.
_STATES_DEFAULT = re.compile(r"(?<!')\bdefaults?\b(?!')")


def _with_default(help_text: str, default: str) -> str:
    """``help_text`` naming its default once: appended unless the text already states it."""
    return help_text if _STATES_DEFAULT.search(help_text) else f"{help_text} (default: {default})"


def config_from_args(cls, args: argparse.Namespace):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            kwargs[f.name] = config_from_args(t, args)
        elif _item_type(t) is not None:
            if getattr(args, f.name, None) is not None:
                kwargs[f.name] = _list_value(getattr(args, f.name), _item_type(t))
        elif hasattr(args, f.name):
            kwargs[f.name] = getattr(args, f.name)
    return cls(**kwargs)


def engine_config(**overrides) -> EngineConfig:
    """Build an EngineConfig from flat keyword overrides (``policy='fixed:8'``, ``num_pages=64``)."""
    def build(cls):
        hints = typing.get_type_hints(cls)
        kw = {}
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                kw[f.name] = build(hints[f.name])
            elif f.name in overrides:
                kw[f.name] = overrides.pop(f.name)
        return cls(**kw)

    cfg = build(EngineConfig)
    if overrides:
        raise TypeError(f"unknown engine options: {sorted(overrides)}")
    return cfg
