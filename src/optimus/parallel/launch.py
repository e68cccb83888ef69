"""Start a tensor-parallel model: rank 0 (the engine's process) spawns the workers, every rank
joins the group, loads its shard and agrees on the number of KV pages; workers then replay
rank 0's calls (``commands.serve_commands``) until it stops them."""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import threading
from collections.abc import Callable

import torch

from optimus.config import EngineConfig
from optimus.executor.kv_storage import KVCacheStorage, capacity_in_pages
from optimus.models.loader import LoadedModel, load_model, resolve_device
from optimus.parallel.commands import STOP, serve_commands
from optimus.parallel.group import TPGroup, free_address, join_group, rank_device
from optimus.parallel.head import ModelParallel
from optimus.parallel.sharding import Shard, ShardingError

log = logging.getLogger(__name__)


class TensorParallel:
    """Rank 0's handle: the group and the worker processes."""

    def __init__(self, group: TPGroup, workers: list) -> None:
        self.group, self.workers = group, workers
        self._stopped = False
        atexit.register(self.stop)

    def stop(self) -> None:
        """Tell the workers to exit and wait for them (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self.group.send((STOP, ()))
        except Exception:  # a worker already gone: the group is broken, nothing to tell
            log.warning("tensor-parallel workers could not be told to stop")
        for w in self.workers:
            w.join(timeout=10)
            if w.is_alive():
                w.terminate()
        self.group.close()


def start(config: EngineConfig) -> TensorParallel:
    """Spawn ranks 1..N-1 and join them as rank 0 (returns once the group stands)."""
    size = config.parallel.tensor_parallel
    base = resolve_device(config.model.device)
    if base.type == "cuda" and torch.cuda.device_count() < (base.index or 0) + size:
        raise ShardingError(f"--tensor-parallel {size} needs {size} GPUs from {base}; "
                            f"{torch.cuda.device_count()} are visible")
    address = free_address()
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=worker_main, args=(rank, size, address, config), daemon=True,
                           name=f"optimus-tp-rank{rank}") for rank in range(1, size)]
    for w in workers:
        w.start()
    group = join_watching(workers, lambda: join_group(0, size, address, rank_device(base, 0)))
    log.info("tensor parallel: %d ranks joined on %s; worker processes %s", size,
             ", ".join(str(rank_device(base, r)) for r in range(size)), ", ".join(str(w.pid) for w in workers))
    return TensorParallel(group, workers)


def join_watching(workers: list, join: Callable[[], TPGroup], poll_s: float = 0.2) -> TPGroup:
    """``join()`` (rank 0's rendezvous), failing at once when a worker process exits before the
    group stands, instead of waiting out the rendezvous timeout for a rank that never comes."""
    result: dict = {}

    def run() -> None:
        try:
            result["group"] = join()
        except BaseException as exc:  # handed to the caller below
            result["error"] = exc

    thread = threading.Thread(target=run, name="optimus-tp-join", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(poll_s)
        dead = next((w for w in workers if w.exitcode is not None), None)
        if dead is not None and thread.is_alive():
            raise RuntimeError(f"tensor-parallel worker {dead.name} exited with code {dead.exitcode} before the "
                               "group formed (its error is in the log above)")
    if "error" in result:
        raise result["error"]
    return result["group"]


def load_shard(config: EngineConfig, group: TPGroup) -> LoadedModel:
    """This rank's part of ``--model`` (read slice by slice: no rank holds the whole model),
    wired to the group: sub-layer outputs summed over ranks, the head vocabulary-parallel."""
    m, placed = config.model, config.parallel.expert_parallel
    loaded = load_model(m.model, dtype=m.dtype, device=str(group.device), revision=m.revision,
                        progress=group.leader, shard=lambda spec: Shard(spec, group.rank, group.size, placed),
                        quantization=m.quantization)
    attach(loaded.model, group, Shard(loaded.spec, group.rank, group.size, placed))
    return loaded


def attach(model, group: TPGroup, shard: Shard) -> None:
    model.parallel = ModelParallel(group, shard.vocab_range, shard.spec.arch.vocab_size)
    for layer in model.model.layers:
        attention = getattr(layer, "self_attn", None) or layer.attention
        attention.reduce = group.all_reduce
        layer.mlp.reduce = group.all_reduce


def shard_storage(config: EngineConfig, model, group: TPGroup) -> KVCacheStorage:
    """This rank's KV pages (its heads); every rank holds the page count the smallest fits."""
    cache, arch = config.cache, model.spec.arch
    dtype = next(model.parameters()).dtype
    pages = cache.num_pages or capacity_in_pages(arch, cache.page_size, dtype, group.device, cache.memory_fraction)
    return KVCacheStorage(arch, group.all_min(pages), cache.page_size, dtype, group.device)


def worker_main(rank: int, size: int, address: str, config: EngineConfig) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank{rank} %(levelname)s %(message)s")
    device = rank_device(resolve_device(config.model.device), rank)
    if device.type == "cpu":  # ranks share the cores: oversubscribed threads stall every collective
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    group = join_group(rank, size, address, device)
    try:
        loaded = load_shard(config, group)
        loaded.model.fuse_projections()
        storage = shard_storage(config, loaded.model, group)
        serve_commands(loaded.model, storage, group)
    finally:
        group.close()
