"""Measured acceptance profiles and their replay (benchmarks of random-weight models).

An acceptance profile records, for a model at each fixed chunk size, how many positions each
decoding step committed, and how many masked positions its window held (``by_open``;
written by ``optimus bench acceptance``). ``ReplayAcceptance`` is a commit rule that replays
it, so benchmarks on random weights commit per step what the measured model did.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from optimus.core.params import SamplingParams


@dataclass(frozen=True)
class Acceptance:
    """A measured acceptance profile. ``by_chunk``: chunk size -> commits of every observed
    step; ``by_open``: chunk size -> masked positions the window held -> commits of those
    steps (empty when the profile predates it)."""

    by_chunk: dict[int, list[int]]
    by_open: dict[int, dict[int, list[int]]] = field(default_factory=dict)
    block: int | None = None  # the measured model's block: a wider window decodes a block at a time

    def in_block(self, masked: int) -> int:
        """The masked positions of the block being decoded, when a window of ``masked`` spans
        several of the model's blocks (the blocks clear in order, so it is the remainder)."""
        return masked if self.block is None or masked <= self.block else (masked - 1) % self.block + 1

    def carry(self, commits: int, masked: int, seen: int) -> int:
        """A draw observed with ``seen`` masked positions, for a window of ``masked``."""
        return rescale(commits, self.in_block(masked), seen)

    def nearest_chunk(self, chunk: int) -> int:
        return min(self.by_chunk, key=lambda c: (abs(c - chunk), c))

    def masked_bucket(self, chunk: int, masked: int) -> tuple[list[int], int] | None:
        """(observed commits, their masked count) of the steps whose window (chunk size
        nearest ``chunk``) held the observed masked count nearest ``masked``; None without
        ``by_open``. A draw k from it stands for ``carry(k, masked, seen)`` commits."""
        table = self.by_open.get(self.nearest_chunk(chunk))
        if not table:
            return None
        masked = self.in_block(masked)
        seen = min(table, key=lambda m: (abs(m - masked), -m))
        return table[seen], seen

    def commits_given_masked(self, chunk: int, masked: int) -> list[int] | None:
        """The commits a window with ``masked`` masked positions may draw (see masked_bucket)."""
        bucket = self.masked_bucket(chunk, masked)
        if bucket is None:
            return None
        obs, seen = bucket
        carried = {k: self.carry(k, masked, seen) for k in set(obs)}  # a bucket holds thousands of a few values
        return [carried[k] for k in obs]

    def window_tau(self) -> dict[int, float]:
        """Mean commits per step over the life of a window that starts with all C positions
        masked, under the conditional replay (C / expected steps to clear it): what a
        benchmark replaying ``by_open`` on long answers shows. Needs ``by_open``."""
        tau = {}
        for c in sorted(self.by_open):
            steps = [0.0]  # steps[m]: expected steps to clear a window with m masked positions
            hists: dict[int, Counter] = {}  # a bucket's commits as {commits: steps} (buckets hold thousands)
            for m in range(1, c + 1):
                obs, seen = self.masked_bucket(c, m)
                hist = hists.setdefault(seen, Counter(obs))
                steps.append(1.0 + sum(n * steps[m - self.carry(k, m, seen)] for k, n in hist.items()) / len(obs))
            tau[c] = c / steps[c]
        return tau


def rescale(commits: int, masked: int, seen: int) -> int:
    """Commits observed with ``seen`` masked positions, carried over to ``masked`` of them."""
    return min(masked, max(1, round(commits * masked / seen)))


def load_acceptance(path: str | Path) -> Acceptance:
    """A measured acceptance profile: ``histograms`` ({chunk: {commits: steps}}, as ``optimus
    bench acceptance`` writes it, with ``by_open`` and the model's ``block`` beside it), or a
    ``distribution`` ({chunk: [commits, ...]}), or a bare distribution mapping."""
    data = json.loads(Path(path).read_text())
    try:
        table = data.get("distribution") or data.get("histograms") or data
        by_chunk = {int(c): _observations(v) for c, v in table.items()}
        by_open = {int(c): {int(m): _observations(h) for m, h in per.items()}
                   for c, per in data.get("by_open", {}).items()}
    except (AttributeError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not an acceptance profile (need 'histograms' or 'distribution': "
                         f"chunk size -> commits per step)") from exc
    empty = sorted(c for c, obs in by_chunk.items() if not obs)
    if not by_chunk or empty:
        raise ValueError(f"{path}: acceptance profile has no observations" + (f" for chunk {empty}" if empty else ""))
    block = data.get("block") if isinstance(data, dict) else None
    return Acceptance(by_chunk, {c: per for c, per in by_open.items() if per}, int(block) if block else None)


def _observations(v) -> list[int]:
    if isinstance(v, dict):  # histogram {commits: count}
        return [int(k) for k, n in v.items() for _ in range(int(n))]
    return [int(x) for x in v]


class ReplayAcceptance:
    """Benchmark-only commit rule: commit as many positions as a measured acceptance profile
    says a chunk of that size commits (sampled from its distribution), most confident first.

    Random-weight models have meaningless confidences; replaying the tokens-per-step that
    the shipped model achieved per chunk size gives throughput numbers with realistic token
    efficiency. With ``by_open`` the draw is conditioned on the masked positions m left in
    the window: drawing a chunk's late-step counts (few, because few were left) for a full
    window would charge large chunks twice. Without it, draws are i.i.d. per chunk size.
    """

    def __init__(self, acceptance: Acceptance, seed: int = 0) -> None:
        if not acceptance.by_chunk:
            raise ValueError("acceptance profile is empty")
        self.acceptance = acceptance
        self.stream = np.random.default_rng(seed)  # one uniform per window's draw, in window order
        # A window of (chunk, masked) draws carried[observed[i]], for a uniform i over its bucket
        # of observations. Flat tables, so a step's windows draw in one vectorised pass:
        # key = _key_of[chunk, masked] (-1: not met yet); its observations are
        # _observed[_first[key]:_first[key] + _size[key]] (buckets shared between keys), its
        # carried table _carried[_carried_at[key]:]. A new key costs a few entries, not a pass
        # over its bucket, inside the step that meets it first.
        self._key_of = np.full((1, 1), -1, np.int64)
        self._first, self._size, self._carried_at = (np.zeros(0, np.int64) for _ in range(3))
        self._observed, self._carried = np.zeros(0, np.int64), np.zeros(0, np.int64)
        self._bucket_at: dict[tuple, int] = {}  # bucket key -> its first index in _observed

    def reseed(self, seed: int) -> None:
        """Restart the draws: benchmark runs of different policies that choose alike then
        draw alike (common random numbers), instead of each getting its own luck."""
        self.stream = np.random.default_rng(seed)

    def counts(self, chunks: np.ndarray, masked: np.ndarray) -> np.ndarray:
        """Commits of windows of ``chunks`` positions with ``masked`` of them masked, drawn in
        order (one uniform each, so drawing at once or window by window is the same)."""
        u = self.stream.random(chunks.size)
        keys = self._keys(np.asarray(chunks, np.int64), np.asarray(masked, np.int64))
        drawn = self._observed[self._first[keys] + (u * self._size[keys]).astype(np.int64)]
        return np.minimum(self._carried[self._carried_at[keys] + drawn], masked)

    def _keys(self, chunks: np.ndarray, masked: np.ndarray) -> np.ndarray:
        """[n] each window's key, adding the (chunk, masked) pairs not met before."""
        if chunks.size and (chunks.max() >= self._key_of.shape[0] or masked.max() >= self._key_of.shape[1]):
            grown = np.full((max(int(chunks.max()) + 1, self._key_of.shape[0]),
                             max(int(masked.max()) + 1, self._key_of.shape[1])), -1, np.int64)
            grown[:self._key_of.shape[0], :self._key_of.shape[1]] = self._key_of
            self._key_of = grown
        keys = self._key_of[chunks, masked]
        if (keys < 0).any():
            for chunk, m in {(c, m) for c, m, k in zip(chunks.tolist(), masked.tolist(), keys.tolist()) if k < 0}:
                self._add_key(chunk, m)
            keys = self._key_of[chunks, masked]
        return keys

    def _add_key(self, chunk: int, masked: int) -> None:
        """The observations a (chunk, masked) window may draw, and each observed count carried
        to its chunk and masked count."""
        acc = self.acceptance
        bucket = acc.masked_bucket(chunk, masked)
        if bucket is None:  # a profile without by_open: i.i.d. per chunk size, rescaled
            size = acc.nearest_chunk(chunk)
            first, observed = self._bucket(("chunk", size), acc.by_chunk[size])
            carried = [max(1, round(k * chunk / size)) for k in range(int(observed.max()) + 1)]
        else:
            obs, seen = bucket
            first, observed = self._bucket((acc.nearest_chunk(chunk), seen), obs)
            carried = [acc.carry(k, masked, seen) for k in range(int(observed.max()) + 1)]
        self._key_of[chunk, masked] = self._first.size
        self._first = np.append(self._first, first)
        self._size = np.append(self._size, observed.size)
        self._carried_at = np.append(self._carried_at, self._carried.size)
        self._carried = np.append(self._carried, np.array(carried, np.int64))

    def _bucket(self, key: tuple, observations: list[int]) -> tuple[int, np.ndarray]:
        """(its first index in the flat observations, the bucket's observations)."""
        if key not in self._bucket_at:
            self._bucket_at[key] = self._observed.size
            self._observed = np.append(self._observed, np.array(observations, np.int64))
        first = self._bucket_at[key]
        return first, self._observed[first:first + len(observations)]

    def __call__(self, conf: torch.Tensor, params: SamplingParams, chunk: int) -> torch.Tensor:
        n = conf.numel()
        return torch.topk(conf, int(self.counts(np.array([chunk]), np.array([n]))[0])).indices

    def keep_many(self, conf: np.ndarray, starts: np.ndarray, lens: np.ndarray, chunks, keep: np.ndarray,
                  pending: np.ndarray) -> np.ndarray:
        """rules.keep_many for the ``pending`` windows: each draws its count in window order (the
        draws one call per window would make), then its most confident positions commit (equal
        confidences: the earlier position first)."""
        counts = np.zeros(lens.size, np.int64)
        windows = np.flatnonzero(pending)
        if windows.size:
            counts[windows] = self.counts(np.asarray(chunks, np.int64)[windows], lens[windows])
        window_of_row = np.repeat(np.arange(lens.size), lens)
        if _keep_most_confident_padded(conf, starts, lens, counts, window_of_row, keep):
            return keep
        order = _by_window_most_confident_first(conf, window_of_row)
        owner = window_of_row[order]
        keep[order[np.arange(conf.size) - starts[owner] < counts[owner]]] = True
        return keep


def _keep_most_confident_padded(conf: np.ndarray, starts: np.ndarray, lens: np.ndarray, counts: np.ndarray,
                                window_of_row: np.ndarray, keep: np.ndarray) -> bool:
    """Mark each window's ``counts`` most confident rows (equal confidences: the earlier row
    first) in ``keep``, by one row-wise sort of the windows padded to the widest; False (nothing
    marked) where confidences may be negative or NaN, or padding would more than quadruple the
    rows. Each row's key is unique in its window: (inverted confidence bits, offset), so the
    ``counts[i]``-th smallest key of window i bounds exactly the rows it commits."""
    conf = np.asarray(conf, np.float32)
    width = int(lens.max(initial=0))
    if not conf.size or lens.size * width > 4 * conf.size + 1024 or not conf.min() >= 0:
        return False
    offset = np.arange(conf.size) - starts[window_of_row]
    bits = (conf + np.float32(0)).view(np.int32).astype(np.int64)  # + 0: -0.0 becomes 0.0
    keys = ((0x7FFFFFFF - bits) << 32) | offset  # ascending: most confident first, then the earlier row
    padded = np.full((lens.size, width), np.iinfo(np.int64).max)
    padded[window_of_row, offset] = keys
    padded.sort(axis=1)
    take = np.minimum(counts, lens)
    bound = np.where(take > 0, padded[np.arange(lens.size), np.maximum(take - 1, 0)], -1)
    keep |= keys <= bound[window_of_row]
    return True


def _by_window_most_confident_first(conf: np.ndarray, window_of_row: np.ndarray) -> np.ndarray:
    """Row order by window, then by confidence descending (equal: the earlier row first).
    Non-negative fp32 confidences order as their bit patterns, so one stable sort of an int64
    key (window, inverted bits) does it, about 10x faster than a two-key lexsort."""
    conf = np.asarray(conf, np.float32)
    if not conf.size or not conf.min() >= 0:  # negatives or NaN: the general sort
        return np.lexsort((-conf, window_of_row))
    bits = (conf + np.float32(0)).view(np.int32).astype(np.int64)  # + 0: -0.0 becomes 0.0
    return np.argsort((window_of_row.astype(np.int64) << 32) | (0x7FFFFFFF - bits), kind="stable")
