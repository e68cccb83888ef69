"""KV pages as the scheduler owns them: a free list over page ids, each page freed exactly once."""

from __future__ import annotations


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
