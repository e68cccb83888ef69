"""Settling a step's requests: each answer measured, its finish checks run (stop ids, stop
strings, max_tokens), the finished ones ended; which ones have news to report.

One request at a time that is a few microseconds of Python each, most of a millisecond a step
at 256 requests, on the path between two steps. :func:`scan_answers` decides the usual case for
all of them with a few array operations over the shared canvases: the answer's new length (each
frontier moved over its committed flags), whether a new answer token is a stop id of any of the
requests, and whether ``max_tokens`` is reached. A request whose answer grew and that none of
these can end is *quiet*: settling it only records the new length. The rest go through
:meth:`Settler.settle`, exact for every case.
"""

from __future__ import annotations

import itertools
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from optimus.core.canvases import Canvases
from optimus.core.outputs import TokenIds
from optimus.core.request import Request
from optimus.engine.stop_strings import first_stop
from optimus.models.detokenizer import IncrementalDetokenizer
from optimus.models.spec import ModelSpec
from optimus.scheduler.scheduler import Scheduler

_IS_DONE = operator.attrgetter("is_done")
_FRONTIER = operator.attrgetter("frontier")
_OUTPUT_LEN = operator.attrgetter("output_len")
_STOP_IDS = operator.attrgetter("stop_ids")


class Settler:
    """The finish checks of a step's requests, before the next step is planned; the
    incremental text they and the outputs read (``text``)."""

    def __init__(self, spec: ModelSpec, tokenizer, scheduler: Scheduler,
                 fail: Callable[[Request, BaseException], None]) -> None:
        self.spec, self.tokenizer, self.scheduler, self.fail = spec, tokenizer, scheduler, fail

    def settle_all(self, requests: list[Request], slots: np.ndarray | None = None) -> list[Request]:
        """:meth:`settle` each of ``requests`` -> those with news, in order. Where all of them
        live on the scheduler's canvases, one array pass (:func:`scan_answers`) settles the quiet
        ones (their answers grew and nothing can end them); only the rest run :meth:`settle`.
        A request whose own checks raise ends through ``fail`` (reported with its news there).
        ``slots``: the requests' slots there, if known (valid for the ones not ended)."""
        live = list(itertools.filterfalse(_IS_DONE, requests))
        if slots is not None and len(live) < len(requests):
            slots = slots[~np.fromiter(map(_IS_DONE, requests), bool, len(requests))]
        requests, canvases = live, self.scheduler.canvases
        if slots is None or not requests:
            slots = canvases.slots(requests) if requests else None
        if slots is None:
            return [r for r in requests if self._guarded_settle(r)]
        scan = scan_answers(canvases, slots, requests, self._stop_union(requests))
        news = scan.grew.copy()
        quiet = np.flatnonzero(scan.quiet)
        first_tokens = quiet[scan.reported[quiet] == 0]
        for i, n in zip(quiet.tolist(), scan.length[quiet].tolist()):
            r = requests[i]
            r.output_len = r.frontier = r.stop_scanned = n  # the answer list grows at output()
        now = time.monotonic()
        for i in first_tokens.tolist():
            requests[i].stats.first_token_time = now
        for i in np.flatnonzero(~scan.quiet & (scan.grew | ~scan.found)).tolist():
            news[i] = self._guarded_settle(requests[i])
        for i in np.flatnonzero(~scan.grew & scan.found).tolist():
            r = requests[i]
            news[i] = bool(r.last_committed or r.events)
        return list(itertools.compress(requests, news.tolist()))

    def _guarded_settle(self, r: Request) -> bool:
        try:
            return self.settle(r)
        except Exception as exc:  # stop checks of one request
            self.fail(r, exc)
            return False

    def _stop_union(self, requests: list[Request]) -> frozenset[int]:
        sets = list(map(_STOP_IDS, requests))
        if None in sets:
            sets = [self._stop_ids(r) for r in requests]
        return frozenset().union(*set(sets))  # requests alike share equal sets: each joined once

    def _stop_ids(self, r: Request) -> frozenset[int]:
        """The ids that end ``r``'s answer (found once)."""
        if r.stop_ids is None:
            p = r.params
            r.stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else frozenset(self.spec.eos_ids))
        return r.stop_ids

    def settle(self, r: Request) -> bool:
        """Finish ``r`` if its answer is complete; whether it has news to report (``output``).
        The cheap half of reporting: the step after may be planned once every request settled."""
        if r.is_done:
            return False
        n = min(r.contiguous_answer_len(), r.params.max_tokens)
        if n == r.output_len:  # the answer did not grow: the finish checks would see what they saw
            return bool(r.last_committed or r.events)
        extend_answer(r, n)
        reason, keep = self._finish_reason(r, n)
        if n > 0 and r.stats.first_token_time is None:
            r.stats.first_token_time = time.monotonic()
        r.output_len = keep if reason else n
        if reason is not None:
            r.stats.finish_time = time.monotonic()
            self.scheduler.finish(r, reason)
        return True

    def _finish_reason(self, r: Request, n: int) -> tuple[str | None, int]:
        """Over the contiguous answer of ``n`` tokens -> (reason or None, tokens to keep).
        Only the tokens not scanned before are read (stop ids), so a step costs O(new)."""
        p = r.params
        stop_ids = self._stop_ids(r)
        first = max(r.stop_scanned, p.min_tokens)
        if stop_ids and first < n:
            for i, token in enumerate(r.answer[first:n], first):
                if token in stop_ids:
                    return "stop", i  # the stop token itself is not part of the answer
        r.stop_scanned = max(r.stop_scanned, n)
        if p.stop:
            text = self.text(r, TokenIds(r.answer, n))
            cut = first_stop(text, p.stop)
            if cut is not None:
                r.done_text = text[:cut]
                return "stop", n
        if n >= p.max_tokens:
            return "length", n
        return None, n

    def text(self, r: Request, ids: TokenIds) -> str:
        """``r``'s text of ``ids``, detokenized incrementally (its detokenizer made once)."""
        if r.detokenizer is None:
            r.detokenizer = IncrementalDetokenizer(self.tokenizer, r.params.skip_special_tokens)
        return r.detokenizer.finish(ids) if r.is_done else r.detokenizer.update(ids)


def extend_answer(r: Request, n: int) -> None:
    """``r.answer`` to at least ``n`` ids (commits are final: the answer only grows at its end)."""
    if n > len(r.answer):
        start = r.geometry.canvas_start
        r.answer.extend(r.tokens[start + len(r.answer):start + n].tolist())


@dataclass(frozen=True)
class AnswerScan:
    """Per request [n]: ``length``, its contiguous answer after the step, capped at max_tokens
    (valid where ``found``); ``grew``: longer than the answer reported so far; ``quiet``: grew,
    and neither a stop id, a stop string nor max_tokens can end it now (min_tokens only defers
    a stop id, so a request with no stop id among its new tokens is quiet with or without it)."""

    found: np.ndarray  # bool: the frontier stopped at a gap within the scanned span
    reported: np.ndarray  # int64: the answer reported so far (Request.output_len)
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
    flags = _committed_ahead(canvases, base + start + frontier, end - start - frontier, span)
    found = ~flags.all(1)
    max_tokens = canvases.max_tokens[slots]
    length = np.minimum(frontier + flags.argmin(1), max_tokens)
    reported = np.fromiter(map(_OUTPUT_LEN, requests), np.int64, n)
    grew = found & (length > reported)
    quiet = grew & (length < max_tokens) & (canvases.stop_strings[slots] == 0)
    if stop_ids and quiet.any():
        rows = np.flatnonzero(quiet)
        news = length[rows] - reported[rows]  # >= 1 each
        owner = np.repeat(rows, news)
        offsets = np.arange(int(news.sum())) - np.repeat(np.cumsum(news) - news, news)
        tokens = canvases.tokens[(base + start + reported)[owner] + offsets]
        hit = np.isin(tokens, np.fromiter(stop_ids, np.int64, len(stop_ids)))
        quiet[owner[hit]] = False
    return AnswerScan(found, reported, length, grew, quiet)


def _committed_ahead(canvases: Canvases, first: np.ndarray, room: np.ndarray, span: int) -> np.ndarray:
    """[n, span] bool: the committed flags of ``span`` positions from each flat index ``first``
    [n] of :attr:`Canvases.committed`, False from the ``room`` [n]-th on (past the canvas)."""
    flat = canvases.committed
    inside = np.arange(span) < room[:, None]
    if first.size and first.max() + span <= flat.size:  # one gather of whole rows of a strided view
        step = flat.strides[0]  # row i of the view: flat[i:i + span] (sliding_window_view, without its checks)
        return np.ndarray((flat.size - span + 1, span), flat.dtype, flat, 0, (step, step))[first] & inside
    at = first[:, None] + np.minimum(np.arange(span), np.maximum(room - 1, 0)[:, None])
    return flat[np.minimum(at, flat.size - 1)] & inside
