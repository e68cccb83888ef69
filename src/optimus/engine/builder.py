"""Build an engine's parts from the config, in dependency order: model, KV pages and storage,
runner (with CUDA graphs), then the chunk policy. The elastic policy is set up last, from the
finished parts (it times steps through the runner), never from a half-built engine."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from optimus.config import EngineConfig
from optimus.decoding.rules import CommitRule, commit_rule_for
from optimus.executor.kv_storage import KVCacheStorage, capacity_in_pages
from optimus.engine.flight import FlightRules, NeverPipeline, PipelineRule, pipeline_rule
from optimus.executor.runner import ModelRunner
from optimus.models.loader import LoadedModel, resolve_device
from optimus.models.spec import AttentionKind, ModelSpec
from optimus.policy.base import ChunkPolicy
from optimus.policy.registry import make_policy
from optimus.scheduler.pages import PageAllocator
from optimus.scheduler.cache_schemes import make_scheme
from optimus.scheduler.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineParts:
    config: EngineConfig
    loaded: LoadedModel
    device: torch.device
    block_size: int  # the denoising block diffusion requests decode in
    commit_rule: CommitRule
    allocator: PageAllocator
    storage: KVCacheStorage
    runner: ModelRunner
    policy: ChunkPolicy
    scheduler: Scheduler
    flights: FlightRules  # which launched steps stay in flight: overlap, pipelined halves (engine.flight)
    parallel: object | None = None  # parallel.launch.TensorParallel (its workers) when sharded

    @property
    def spec(self) -> ModelSpec:
        return self.loaded.spec


@dataclass(frozen=True)
class _Hardware:
    """What the policy's setup may use: every part but the policy and the scheduler."""

    config: EngineConfig
    loaded: LoadedModel
    device: torch.device
    allocator: PageAllocator
    runner: ModelRunner
    block_size: int

    @property
    def spec(self) -> ModelSpec:
        return self.loaded.spec


# Young objects between cyclic collections. Python's default (700) runs a collection every
# few hundred allocations; a step at 256 requests allocates tens of thousands (plans, views,
# commit events), and the collections that traverse its long-lived requests took about 1 ms
# of a 5 ms host step (`optimus bench host`, 2 cores, 2026-12-05). Cycles are still collected.
GC_YOUNG_THRESHOLD = 50_000


def quiet_gc() -> None:
    """Collect cycles less often in a process that runs a step loop (process-wide, idempotent)."""
    young, *older = gc.get_threshold()
    if young < GC_YOUNG_THRESHOLD:
        gc.set_threshold(GC_YOUNG_THRESHOLD, *older)


def build_parts(config: EngineConfig, loaded: LoadedModel | None = None,
                commit_rule: CommitRule | None = None) -> EngineParts:
    device = resolve_device(config.model.device)
    parallel = None
    if config.parallel.tensor_parallel > 1:
        loaded, storage, parallel = _sharded(config, loaded)
        device = parallel.group.device
    elif loaded is None:
        from optimus.models.loader import load_model
        loaded = load_model(config.model.model, dtype=config.model.dtype, device=str(device),
                            revision=config.model.revision, quantization=config.model.quantization)
    loaded.model.fuse_projections()  # q/k/v and gate/up as one matmul each (views, no copy)
    spec = loaded.spec
    block_size = block_size_for(spec, config)
    cache = config.cache
    if parallel is None:
        storage = _storage(config, loaded.model, device)
    num_pages = storage.keys[0].shape[0]
    allocator = PageAllocator(num_pages, cache.page_size)
    scheme = make_scheme(config.scheduler.cache_mode, spec.attention, config.scheduler.suffix_window)
    graphs = None if parallel else _graphs(config, spec, loaded.model, storage, device, num_pages, block_size,
                                           scheme.cache_only)
    runner = ModelRunner(loaded.model, storage, cache.page_size, device, config.runner.attention_backend, graphs,
                         cache_only=scheme.cache_only)
    hardware = _Hardware(config, loaded, device, allocator, runner, block_size)
    # The halves' rule reads the policy's latency curve, and the policy which steps overlap.
    flights = FlightRules(spec.attention is AttentionKind.CAUSAL, config.runner.overlap, NeverPipeline(),
                          overlap_diffusion=scheme.prefills)
    policy = build_policy(config, hardware, flights.overlaps_unit_steps)
    flights.pipeline = build_pipeline(config, policy, hardware)
    scheduler = Scheduler(config.scheduler, allocator, policy, spec.attention, scheme)
    quiet_gc()  # the parts will run a step loop
    return EngineParts(config, loaded, device, block_size, commit_rule or commit_rule_for(config),
                       allocator, storage, runner, policy, scheduler, flights, parallel)


def _storage(config: EngineConfig, model, device: torch.device) -> KVCacheStorage:
    cache, arch = config.cache, model.spec.arch
    dtype = next(model.parameters()).dtype
    num_pages = cache.num_pages or capacity_in_pages(arch, cache.page_size, dtype, device, cache.memory_fraction)
    return KVCacheStorage(arch, num_pages, cache.page_size, dtype, device)


def _sharded(config: EngineConfig, loaded: LoadedModel | None):
    """Rank 0 of a tensor-parallel engine: workers started, its shard and KV pages (the
    model's own spec is the shard's: its heads). CUDA graphs are not captured (yet) here."""
    if loaded is not None:
        raise ValueError("a tensor-parallel engine loads its model itself (each rank reads its shard)")
    from optimus.parallel import launch

    parallel = launch.start(config)
    try:
        loaded = launch.load_shard(config, parallel.group)
        loaded.model.fuse_projections()
        return loaded, launch.shard_storage(config, loaded.model, parallel.group), parallel
    except BaseException:
        parallel.stop()
        raise


def block_size_for(spec: ModelSpec, config: EngineConfig) -> int:
    """Causal models decode one position at a time whatever this says (``make_geometry``)."""
    if spec.attention is AttentionKind.BLOCK_CAUSAL:
        return spec.block_size  # trained with it: not a decoding choice
    return config.scheduler.block_size or spec.block_size or 32


def build_policy(config: EngineConfig, hardware, unit_steps_overlap: bool) -> ChunkPolicy:
    """``hardware``: config, loaded model, device, allocator and runner (elastic times steps)."""
    if not config.scheduler.policy.startswith("elastic"):
        return make_policy(config.scheduler.policy)
    from optimus.policy.elastic.setup import elastic_kwargs
    return make_policy(config.scheduler.policy, **elastic_kwargs(hardware), unit_steps_overlap=unit_steps_overlap)


def build_pipeline(config: EngineConfig, policy: ChunkPolicy, hardware) -> PipelineRule:
    """``runner.pipeline``; ``auto`` predicts with the elastic policy's latency curve, or the
    device's saved one (measured on first start, as elastic's)."""
    text = config.runner.pipeline
    if text != "auto":
        return pipeline_rule(text)
    profile = getattr(policy, "profile", None)
    if profile is None:
        from optimus.policy.elastic.setup import load_or_profile
        profile = load_or_profile(hardware)
    return pipeline_rule(text, profile.predict)


def _graphs(config: EngineConfig, spec: ModelSpec, model, storage: KVCacheStorage, device: torch.device,
            num_pages: int, block_size: int, cache_only: bool):
    rc = config.runner
    if not (rc.cuda_graphs and device.type == "cuda"):
        return None
    from optimus.executor.cuda_graphs import GraphedBody
    max_pages = min(num_pages, -(-spec.arch.max_position // config.cache.page_size))
    graphs = GraphedBody(model, storage, rc.attention_backend, rc.graph_max_tokens,
                         config.scheduler.max_running, max_pages, cache_only,
                         capture_prompt_steps=rc.graph_capture == "all")
    if rc.graph_precapture:
        # A decoding request runs at most a stored block plus a window (two blocks of rows);
        # a causal one, its one new token.
        keys = graphs.decode_keys(2 * block_size if spec.attention is not AttentionKind.CAUSAL else 1)
        log.info("capturing %d CUDA graphs", len(keys))
        # disable=None: a bar on a terminal only; in a log its carriage returns glue lines together
        with tqdm(total=len(keys), desc="CUDA graphs", unit="graph", leave=False, disable=None) as bar:
            graphs.precapture(keys, progress=lambda key: bar.update())
    return graphs
