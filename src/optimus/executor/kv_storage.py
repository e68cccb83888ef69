"""The paged KV cache on the device, and how many pages fit (page ownership: scheduler/pages.py)."""

from __future__ import annotations

import torch

from optimus.models.spec import ArchConfig


class KVCacheStorage:
    """Device tensors: per layer K and V of shape [num_pages, page_size, Hkv, D]."""

    def __init__(self, arch: ArchConfig, num_pages: int, page_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_pages, page_size, arch.num_kv_heads, arch.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)]


def bytes_per_page(arch: ArchConfig, page_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * arch.num_layers * page_size * arch.num_kv_heads * arch.head_dim * itemsize


def capacity_in_pages(arch: ArchConfig, page_size: int, dtype: torch.dtype, device: torch.device,
                      memory_fraction: float, cpu_budget_bytes: int = 1 << 30) -> int:
    """Pages that fit in ``memory_fraction`` of the free device memory (a fixed budget on CPU).
    Memory torch's allocator holds but no tensor uses counts as free: it would serve the cache
    (an engine freed earlier in the process leaves its cache there until ``empty_cache``)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = int(free * memory_fraction)
    else:
        budget = int(cpu_budget_bytes * memory_fraction)
    return max(1, budget // bytes_per_page(arch, page_size, dtype))
