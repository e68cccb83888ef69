"""Paged KV cache: fixed-size pages, a page table per request, pages freed exactly once."""

from __future__ import annotations

import torch

from optimus.models.spec import ArchConfig


class PageAllocator:
    """Free-list allocator over page ids ``0..num_pages-1``. Pure Python, unit-testable."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        self._free = list(range(num_pages - 1, -1, -1))
        self._in_use: set[int] = set()

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return len(self._in_use)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV cache exhausted: asked for {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        self._in_use.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if p not in self._in_use:
                raise RuntimeError(f"page {p} freed twice or never allocated")
            self._in_use.remove(p)
            self._free.append(p)

    def reclaim(self, owned: set[int]) -> int:
        """Make every page not in ``owned`` free again (recovery after a failed step, whose
        requests may have lost track of pages); returns how many pages were reclaimed."""
        lost = self._in_use - owned
        self._in_use = set(owned)
        self._free = [p for p in range(self.num_pages - 1, -1, -1) if p not in owned]
        return len(lost)

    def ensure(self, pages: list[int], num_tokens: int) -> bool:
        """Grow ``pages`` in place to hold ``num_tokens``; False (and no change) if memory is short."""
        need = self.pages_for(num_tokens) - len(pages)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        pages.extend(self.allocate(need))
        return True


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
