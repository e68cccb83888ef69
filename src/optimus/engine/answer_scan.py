"""A step's finish checks for many requests at once, over the shared canvases.

After a step's commits every request it touched is settled (``Postprocessor.settle``): its
contiguous answer is measured, scanned for stop ids and cut at ``max_tokens``. One request at a
time that is a few microseconds of Python each, most of a millisecond a step at 256 requests, on
the path between two steps. :func:`scan_answers` decides the usual case for all of them with a
few array operations: the answer's new length (each frontier moved over its committed flags),
whether a new answer token is a stop id of any of the requests, and whether ``max_tokens`` is
reached. A request whose answer grew and that none of these can end is *quiet*: settling it
only records the new length. The rest go through ``Postprocessor.settle``, exact for every case.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

from optimus.core.canvases import Canvases

_FRONTIER = operator.attrgetter("frontier")
_OUTPUT_LEN = operator.attrgetter("output_len")
_MAX_TOKENS = operator.attrgetter("params.max_tokens")
_STOP_STRINGS = operator.attrgetter("params.stop")


@dataclass(frozen=True)
class AnswerScan:
    """Per request [n]: ``length``, its contiguous answer after the step, capped at max_tokens
    (valid where ``found``); ``grew``: longer than the answer reported so far; ``quiet``: grew,
    and neither a stop id, a stop string nor max_tokens can end it now (min_tokens only defers
    a stop id, so a request with no stop id among its new tokens is quiet with or without it)."""

    found: np.ndarray  # bool: the frontier stopped at a gap within the scanned span
    length: np.ndarray  # int64
    grew: np.ndarray  # bool
    quiet: np.ndarray  # bool


def scan_answers(canvases: Canvases, slots: np.ndarray, requests: list, stop_ids: frozenset[int]) -> AnswerScan:
    """``requests`` [n], all adopted by ``canvases`` (``slots``: theirs), none finished;
    ``stop_ids``: the union of their stop token id sets (a superset only routes a request to the
    exact check). A frontier moves by at most a block a step (windows never cross their block),
    so a span of the widest block plus one is scanned; a request that finds no gap in it is not
    ``found`` (the exact check measures it)."""
    n = len(requests)
    frontier = np.fromiter(map(_FRONTIER, requests), np.int64, n)
    start, end, base = canvases.canvas_start[slots], canvases.canvas_end[slots], canvases.base[slots]
    span = int(canvases.block_size[slots].max(initial=0)) + 1
    at = (start + frontier)[:, None] + np.arange(span)  # [n, span] absolute positions
    inside = at < end[:, None]
    flags = inside & canvases.committed[base[:, None] + np.minimum(at, (end - 1)[:, None])]
    found = ~flags.all(1)
    max_tokens = np.fromiter(map(_MAX_TOKENS, requests), np.int64, n)
    length = np.minimum(frontier + flags.argmin(1), max_tokens)
    reported = np.fromiter(map(_OUTPUT_LEN, requests), np.int64, n)
    grew = found & (length > reported)
    quiet = grew & (length < max_tokens)
    quiet &= ~np.fromiter(map(bool, map(_STOP_STRINGS, requests)), bool, n)
    if stop_ids and quiet.any():
        rows = np.flatnonzero(quiet)
        news = length[rows] - reported[rows]  # >= 1 each
        owner = np.repeat(rows, news)
        offsets = np.arange(int(news.sum())) - np.repeat(np.cumsum(news) - news, news)
        tokens = canvases.tokens[(base + start + reported)[owner] + offsets]
        hit = np.isin(tokens, np.fromiter(stop_ids, np.int64, len(stop_ids)))
        quiet[owner[hit]] = False
    return AnswerScan(found, length, grew, quiet)
