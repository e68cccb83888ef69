"""ModelRunner: turns a StepPlan into one forward pass over the ragged batch and returns
the logits of exactly the rows whose predictions are needed."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from optimus.engine.kv_cache import KVCacheStorage
from optimus.engine.scheduler import StepPlan
from optimus.kernels import group_attention, visible_key_end, write_kv
from optimus.models.transformer import DecoderLM


@dataclass(frozen=True)
class StepBatch:
    """Device tensors of one step. T = rows in the step, R = requests, M = logit rows."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    groups: torch.Tensor  # [T] int32, nondecreasing per request
    slots: torch.Tensor  # [T] int64, -1 = not stored
    cu_q: torch.Tensor  # [R+1] int32
    cache_lens: torch.Tensor  # [R] int32, cache length before this step
    page_table: torch.Tensor  # [R, max_pages] int32
    logit_rows: torch.Tensor  # [M] int64 rows of the step whose logits are needed
    max_q_len: int


@dataclass(frozen=True)
class LogitRequest:
    """Which predicted positions of a work item the rows of ``logits[offset:offset+n]`` serve."""

    work_index: int
    positions: tuple[int, ...]
    offset: int


class PagedBackend:
    """The engine's AttentionBackend: store the step's K/V, then attend over cache + groups."""

    def __init__(self, storage: KVCacheStorage, batch: StepBatch, attention_backend: str) -> None:
        self.storage, self.batch, self.attention_backend = storage, batch, attention_backend
        self._key_end: torch.Tensor | None = None  # per-step metadata shared by every layer

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b = self.batch
        if self._key_end is None and q.is_cuda:
            self._key_end = visible_key_end(b.cu_q, b.groups)
        k_cache, v_cache = self.storage.keys[layer], self.storage.values[layer]
        out = group_attention(q, k, v, k_cache, v_cache, b.page_table, b.cache_lens, b.cu_q, b.groups,
                              backend=self.attention_backend, max_q_len=b.max_q_len, key_end=self._key_end)
        write_kv(k, v, k_cache, v_cache, b.slots)  # after attention: cache_lens exclude these rows
        return out


class ModelRunner:
    def __init__(self, model: DecoderLM, storage: KVCacheStorage, page_size: int,
                 device: torch.device, attention_backend: str = "auto", graphs=None) -> None:
        self.model, self.storage, self.page_size = model, storage, page_size
        self.device, self.attention_backend = device, attention_backend
        self.graphs = graphs  # optional GraphedBody (CUDA only)
        self.last_build_s = 0.0  # host time spent building the latest batch

    def build(self, plan: StepPlan) -> tuple[StepBatch, list[LogitRequest]]:
        ids, pos, groups, slots, cu, lens, logit_rows, wants = [], [], [], [], [0], [], [], []
        ps = self.page_size
        max_pages = max((len(w.request.pages) for w in plan.works), default=1) or 1
        table = torch.zeros((len(plan.works), max_pages), dtype=torch.int32)
        for i, w in enumerate(plan.works):
            r = w.request
            base = cu[-1]
            ids.extend(r.tokens[w.start:w.end])
            pos.extend(range(w.start, w.end))
            groups.extend(w.groups)
            slots.extend(r.pages[p // ps] * ps + p % ps if p < w.store_end else -1 for p in range(w.start, w.end))
            cu.append(base + w.end - w.start)
            lens.append(w.start)
            if r.pages:
                table[i, :len(r.pages)] = torch.tensor(r.pages, dtype=torch.int32)
            if w.window is not None:
                shift = r.geometry.shift
                masked = tuple(p for p in range(*w.window) if not r.committed[p])
                if masked:
                    wants.append(LogitRequest(i, masked, len(logit_rows)))
                    logit_rows.extend(base + p - shift - w.start for p in masked)
        dev = self.device
        batch = StepBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(pos, dtype=torch.long, device=dev),
            groups=torch.tensor(groups, dtype=torch.int32, device=dev),
            slots=torch.tensor(slots, dtype=torch.long, device=dev),
            cu_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            cache_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            page_table=table.to(dev),
            logit_rows=torch.tensor(logit_rows, dtype=torch.long, device=dev),
            max_q_len=max((w.end - w.start for w in plan.works), default=1),
        )
        return batch, wants

    def forward(self, batch: StepBatch) -> torch.Tensor:
        if self.graphs is not None and self.graphs.fits(batch):
            return self.graphs.run(batch)
        return self.model(batch.input_ids, batch.positions, PagedBackend(self.storage, batch, self.attention_backend))

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> tuple[torch.Tensor, list[LogitRequest]]:
        """-> (final hidden states [M, d] of the rows whose logits are needed, what each serves)."""
        t0 = time.perf_counter()
        batch, wants = self.build(plan)
        self.last_build_s = time.perf_counter() - t0
        hidden = self.forward(batch)
        return hidden[batch.logit_rows], wants

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden).float()

    @torch.inference_mode()
    def greedy(self, hidden: torch.Tensor, rows_per_pass: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [M, d] -> (argmax tokens [M], their softmax probability [M]) on the CPU.

        The LM head runs in slices so the [M, vocab] fp32 logits never exist all at once.
        """
        tokens, conf = [], []
        for h in hidden.split(rows_per_pass):
            probs = torch.softmax(self.model.logits(h).float(), dim=-1)
            c, t = probs.max(dim=-1)
            tokens.append(t)
            conf.append(c)
        if not tokens:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0)
        return torch.cat(tokens).cpu(), torch.cat(conf).cpu()
