"""What rank 0 tells the workers, and the workers' loop that replays it.

Every model call on rank 0 (``DecoderLM.forward``, ``logits``, ``greedy``, ``sample``) is announced first
(``head.ModelParallel.announce``): its tensors, moved to the CPU, and a recipe of its attention
backend, which the worker rebuilds over its own KV pages. Then every rank makes the same call,
so the collectives inside (one all-reduce per sub-layer, the head's gather) pair up in order.
Invariant: rank 0 announces exactly the calls it makes, in the order it makes them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace

import torch

from optimus.decoding.rules import RowDraws
from optimus.executor.kv_storage import KVCacheStorage
from optimus.executor.runner import PagedBackend, StepBatch
from optimus.models.dense import DenseBackend
from optimus.parallel.group import TPGroup

log = logging.getLogger(__name__)

STOP = "stop"


@dataclass(frozen=True)
class PagedRecipe:
    batch: StepBatch  # CPU tensors
    attention_backend: str
    cache_only: bool

    def build(self, storage: KVCacheStorage, device: torch.device) -> PagedBackend:
        batch = StepBatch(**{name: _to(getattr(self.batch, name), device) for name in StepBatch.__dataclass_fields__})
        return PagedBackend(storage, batch, self.attention_backend, self.cache_only)


@dataclass(frozen=True)
class DenseRecipe:
    batch: int
    length: int
    mask: torch.Tensor | None

    def build(self, storage: KVCacheStorage, device: torch.device) -> DenseBackend:
        return DenseBackend(self.batch, self.length, _to(self.mask, device))


def recipe(backend) -> PagedRecipe | DenseRecipe:
    if isinstance(backend, PagedBackend):
        b = backend.batch
        cpu = StepBatch(**{name: _to(getattr(b, name), torch.device("cpu")) for name in StepBatch.__dataclass_fields__})
        return PagedRecipe(cpu, backend.attention_backend, backend.cache_only)
    if isinstance(backend, DenseBackend) and not backend.cache.keys:
        return DenseRecipe(backend.batch, backend.length, _to(backend.mask, torch.device("cpu")))
    raise TypeError(f"a tensor-parallel model cannot replay attention through {type(backend).__name__}")


def message(op: str, args: tuple) -> tuple:
    """(op, args) with tensors on the CPU and the backend as its recipe."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a.cpu())
        elif isinstance(a, RowDraws):
            out.append(_to(a, torch.device("cpu")))
        elif hasattr(a, "attend"):
            out.append(recipe(a))
        else:
            out.append(a)
    return op, tuple(out)


@torch.inference_mode()
def serve_commands(model, storage: KVCacheStorage, group: TPGroup) -> None:
    """A worker's life after loading: replay rank 0's calls until it says stop."""
    device = group.device
    while True:
        op, args = group.receive()
        if op == STOP:
            return
        args = [a.build(storage, device) if hasattr(a, "build") else _to(a, device) for a in args]
        if op == "forward":
            model(*args)
        elif op == "logits":
            model.logits(*args)
        elif op == "greedy":
            model.greedy(*args)
        elif op == "sample":
            model.sample(*args)
        else:
            raise RuntimeError(f"unknown tensor-parallel command {op!r}")


def _to(x, device: torch.device):
    if isinstance(x, RowDraws):
        return replace(x, **{f.name: getattr(x, f.name).to(device) for f in fields(RowDraws)})
    return x.to(device) if isinstance(x, torch.Tensor) else x
