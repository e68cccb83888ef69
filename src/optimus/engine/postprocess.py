"""After the forward: turn a step's logits into commits, then finish and report requests.

Commit: greedy requests share one batched LM-head pass (picked at launch when every row is
greedy) and one pass of the commit rule over all their windows (``rules.keep_many``); sampled or
constrained (``min_tokens``) rows share one head call and one vectorised draw. Settle
(``engine/settle.py``): the finish checks, a finished request ends there. Output: the answer,
detokenized incrementally, as a ``RequestOutput`` (the engine builds it after the next step's
launch).

Failures in one request's own code (sampling, constraint, commit, stop checks, detokenizing) end
that request only, through ``fail``; the engine reports it with the step's news."""

from __future__ import annotations

import itertools
import operator
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from optimus.core.canvases import Canvases
from optimus.core.outputs import CommitEvent, RequestOutput, TokenIds
from optimus.core.params import SamplingParams
from optimus.core.plan import RequestWork, StepPlan
from optimus.core.request import Request
from optimus.decoding.rules import GREEDY_TEMPERATURE, CommitRule, RowDraws, keep_many
from optimus.engine.settle import Settler, extend_answer
from optimus.engine.stats import EngineStats
from optimus.executor.sampled_rows import propose  # rules.propose, also on a shard's undrawn rows
from optimus.engine.stop_strings import hold_back_stop_prefix
from optimus.executor.logit_wants import LogitRequest, LogitWants
from optimus.executor.runner import GreedyPick, ModelRunner
from optimus.models.spec import ModelSpec
from optimus.scheduler.scheduler import Scheduler


# Sampled rows go through the head in passes of about this many rows: each pass holds [rows,
# vocab] fp32 logits and int64 noise (1,024 x 152k: 0.6 + 1.2 GB), never a whole step's worth.
SAMPLED_ROWS_PER_PASS = 1024
_IS_DONE = operator.attrgetter("is_done")
_REQUEST = operator.attrgetter("request")


def _rows_of(wants: list[LogitRequest]) -> np.ndarray:
    """The logit rows of ``wants``, one after another."""
    return np.concatenate([np.arange(w.offset, w.offset + len(w.positions)) for w in wants])


def _by_rows(wants: list[LogitRequest], limit: int) -> list[list[LogitRequest]]:
    """``wants`` in order, cut where a part would pass ``limit`` rows (a larger want is alone)."""
    parts: list[list[LogitRequest]] = []
    rows = limit
    for w in wants:
        if rows + len(w.positions) > limit:
            parts.append([])
            rows = 0
        parts[-1].append(w)
        rows += len(w.positions)
    return parts


def _clear_commit_counts(plan: StepPlan) -> None:
    """Every request of ``plan`` at no commit yet this step (its commit, if any, sets both)."""
    for r in plan.requests():
        r.last_committed, r.open_after = 0, -1


class Postprocessor:
    def __init__(self, spec: ModelSpec, tokenizer, commit_rule: CommitRule, runner: ModelRunner,
                 scheduler: Scheduler, fail: Callable[[Request, BaseException], None]) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.commit_rule = commit_rule  # (conf, params, chunk) -> indices to commit
        self.runner = runner
        self.scheduler = scheduler
        self.fail = fail
        self.settler = Settler(spec, tokenizer, scheduler, fail)  # finish checks, before the next plan
        self.step_index = 0  # the engine's step counter, stamped on commit events
        self.host_commit_s = 0.0  # host time of the latest greedy commit pass
        # Commits whose statistics and events are not yet recorded, in commit order: (works,
        # their committed positions and tokens laid end to end, where each work's end there,
        # step index).
        self._unaccounted: list[tuple[list[RequestWork], list[int], list[int], list[int], int]] = []
        self.stream_text = True  # detokenize every output (servers); offline use turns it off
        self.final_text = True  # decode a finished answer; off where the caller detokenizes (engine process)

    # ---- commit ------------------------------------------------------------------------
    def is_plain_greedy(self, r: Request) -> bool:
        """Greedy with no ids suppressed: its rows take the batched greedy pick. A function of
        the request's parameters alone, so found once (asked twice per request per step)."""
        plain = r.plain_greedy
        if plain is None:
            plain = r.plain_greedy = r.params.temperature <= GREEDY_TEMPERATURE and not self._suppressed_ids(r)
        return plain

    def all_plain_greedy(self, requests: Iterable[Request]) -> bool:
        """Whether every one ``is_plain_greedy``: its cached flag read first, found where unknown."""
        return all(r.plain_greedy or (r.plain_greedy is None and self.is_plain_greedy(r)) for r in requests)

    def commit_step(self, plan: StepPlan, hidden: torch.Tensor, wants: LogitWants, pick: GreedyPick | None) -> None:
        """Commit the step's proposals; ``pick``: every logit row already picked greedily.
        Every request of the plan holds its commit count of this step after it (0: none)."""
        h0 = time.perf_counter()
        if pick is not None:
            works = wants.works(plan)
            if not any(map(_IS_DONE, map(_REQUEST, works))):  # the usual step: every window at once
                if len(works) < len(plan.works) or plan.slots() is None:  # else _apply_all sets them all
                    _clear_commit_counts(plan)
                tokens, conf = pick.read()
                h0 = time.perf_counter()
                self._commit_greedy(plan, wants, works, wants.work_index, wants.lens, wants.positions, tokens, conf)
                self.host_commit_s = time.perf_counter() - h0
                return
        _clear_commit_counts(plan)
        fast, slow = [], []
        for w in wants:
            r = plan.works[w.work_index].request
            if not r.is_done:  # finished or aborted while the step was in flight: drop its rows
                (fast if self.is_plain_greedy(r) else slow).append(w)
        if fast:
            if pick is not None:  # every logit row was picked at launch, in row order
                tokens, conf = pick.read()
                if len(fast) < len(wants):  # some requests ended while it ran: their rows go
                    index = torch.from_numpy(_rows_of(fast))
                    tokens, conf = tokens[index], conf[index]
            else:  # greedy rows among sampled ones: gather them, pick them now
                index = torch.from_numpy(_rows_of(fast)).to(hidden.device)
                tokens, conf = self.runner.greedy(hidden[index]).read()
            h0 = time.perf_counter()
            lens = np.fromiter((len(w.positions) for w in fast), np.int64, len(fast))
            positions = np.fromiter(itertools.chain.from_iterable(w.positions for w in fast), np.int64,
                                    int(lens.sum()))
            index = [w.work_index for w in fast]
            self._commit_greedy(plan, fast, [plan.works[i] for i in index], np.array(index, np.int64), lens, positions,
                                tokens, conf)
        self.host_commit_s = time.perf_counter() - h0
        for part in _by_rows(slow, SAMPLED_ROWS_PER_PASS):
            self._commit_sampled(plan, hidden, part)

    def _commit_greedy(self, plan: StepPlan, fast: Sequence[LogitRequest], works: list[RequestWork],
                       work_index: np.ndarray, lens: np.ndarray, positions: np.ndarray, tokens: torch.Tensor,
                       conf: torch.Tensor) -> None:
        """Greedy windows: ``fast``'s, of ``works`` (the plan's works ``work_index`` [n], none of
        them ended), ``lens`` [n] rows each, their masked ``positions`` and rows laid end to end in
        ``tokens``/``conf`` [M]. The commit rule decides every window in one pass
        (rules.keep_many), then each request takes its commits."""
        columns = plan.columns()
        try:
            keep = keep_many(self.commit_rule, conf.float().numpy(), lens, _ParamsOf(works),
                             (columns.hi - columns.lo)[work_index])
        except Exception:  # noqa: BLE001 - a request's own numerics or parameters: found one by one
            _clear_commit_counts(plan)  # a request that fails commits nothing
            self._commit_each(works, fast, tokens, conf)
            return
        chosen = np.flatnonzero(keep)
        ends = np.searchsorted(chosen, np.cumsum(lens))
        canvases = plan.canvases
        held = plan.slots()  # valid for the requests of works: none ended
        if held is not None:
            slots = held[work_index]
        else:
            slots = canvases.slots(map(_REQUEST, works)) if canvases is not None else None
        if slots is not None:
            self._apply_all(works, canvases, canvases.base[slots], positions, chosen, tokens.numpy()[chosen], lens,
                            ends)
            return
        bounds = ends.tolist()
        chosen_positions, chosen_tokens = positions[chosen].tolist(), tokens.numpy()[chosen].tolist()
        a = 0
        for work, b, n in zip(works, bounds, lens.tolist()):
            try:
                self._apply(work, chosen_positions[a:b], chosen_tokens[a:b], n)
            except Exception as exc:
                self.fail(work.request, exc)
            a = b

    def _apply_all(self, works: list[RequestWork], canvases: Canvases, base: np.ndarray, positions: np.ndarray,
                   chosen: np.ndarray, tokens: np.ndarray, lens: np.ndarray, ends: np.ndarray) -> None:
        """:meth:`_apply` for every work at once, their canvases in ``canvases`` (``base`` [n]:
        each one's span start there): ``positions`` [M] the windows' masked positions laid end
        to end (``lens`` [n] a window), ``chosen`` the indices of those committed (``ends`` [n]:
        where each window's commits end in ``chosen``), ``tokens`` theirs. One indexed write
        each for tokens and flags; a loop only sets two counters."""
        requests = list(map(_REQUEST, works))
        owner = np.repeat(np.arange(len(works)), lens)[chosen]
        committed_positions = positions[chosen]
        at = base[owner] + committed_positions
        canvases.tokens[at] = tokens
        canvases.committed[at] = True
        counts = ends.copy()  # each window's commits (np.diff with prepend costs several times more)
        counts[1:] -= ends[:-1]
        for r, n, left in zip(requests, counts.tolist(), (lens - counts).tolist()):
            r.last_committed, r.open_after = n, left
        self._unaccounted.append((works, committed_positions.tolist(), tokens.tolist(), ends.tolist(),
                                  self.step_index))

    def _commit_each(self, works: list[RequestWork], fast: list[LogitRequest], tokens: torch.Tensor,
                     conf: torch.Tensor) -> None:
        token_list = tokens.tolist()
        first = 0
        for work, w in zip(works, fast):
            n = len(w.positions)
            self._guarded_commit(work, w.positions, token_list[first:first + n], conf[first:first + n])
            first += n

    def _commit_sampled(self, plan: StepPlan, hidden: torch.Tensor, slow: list[LogitRequest]) -> None:
        """Sampled (or constrained) rows: one head call and one vectorised draw for all of them."""
        logits = self.runner.sampled_logits(hidden[torch.from_numpy(_rows_of(slow)).to(hidden.device)])
        first = np.cumsum([0] + [len(w.positions) for w in slow]).tolist()
        ok, rows = [], []
        for w, lo, hi in zip(slow, first, first[1:]):
            r = plan.works[w.work_index].request
            try:
                self._constrain(r, w.positions, logits[lo:hi])  # in place, on this request's rows
            except Exception as exc:  # one request's numerics or parameters never stop the engine
                self.fail(r, exc)
                continue
            ok.append((w, lo, hi))
            rows.extend((r.params, q, r.draws) for q in w.positions)
            r.draws += 1
        if not ok:
            return
        keep = torch.from_numpy(np.concatenate([np.arange(lo, hi) for _, lo, hi in ok])).to(logits.device)
        drawn = self._draw(plan, logits[keep], rows, [w for w, _, _ in ok])
        for w, _, _ in ok:
            if w.work_index in drawn:
                self._guarded_commit(plan.works[w.work_index], w.positions, *drawn[w.work_index])

    def _draw(self, plan: StepPlan, logits: torch.Tensor, rows: list, wants: list[LogitRequest]) -> dict:
        """{work index: (tokens, confidences)}: one draw for every row; should it raise, request
        by request, failing only the requests whose own rows raise."""
        spans = np.cumsum([0] + [len(w.positions) for w in wants]).tolist()
        try:
            tokens, conf = propose(logits, RowDraws.of(rows, logits.device))
            tokens, conf = tokens.tolist(), conf.cpu()
            return {w.work_index: (tokens[a:b], conf[a:b]) for w, a, b in zip(wants, spans, spans[1:])}
        except Exception:  # noqa: BLE001 - found and failed request by request below
            pass
        out = {}
        for w, a, b in zip(wants, spans, spans[1:]):
            try:
                t, c = propose(logits[a:b], RowDraws.of(rows[a:b], logits.device))
                out[w.work_index] = (t.tolist(), c.cpu())
            except Exception as exc:
                self.fail(plan.works[w.work_index].request, exc)
        return out

    def _guarded_commit(self, work: RequestWork, positions: tuple[int, ...], tokens: list[int],
                        conf: torch.Tensor) -> None:
        try:
            self._commit(work, positions, tokens, conf)
        except Exception as exc:
            self.fail(work.request, exc)

    def _constrain(self, r: Request, positions: tuple[int, ...], logits: torch.Tensor) -> torch.Tensor:
        """min_tokens: end-of-answer ids are impossible before the answer is long enough."""
        suppress = self._suppressed_ids(r)
        start = r.geometry.canvas_start
        early = [i for i, q in enumerate(positions) if q - start < r.params.min_tokens]
        if suppress and early:
            logits[torch.tensor(early, device=logits.device)[:, None],
                   torch.tensor(suppress, device=logits.device)] = float("-inf")
        return logits

    def _suppressed_ids(self, r: Request) -> list[int]:
        if r.params.min_tokens == 0:
            return []
        return sorted(set(self.spec.eos_ids) | set(r.params.stop_token_ids))

    def _commit(self, work: RequestWork, positions: tuple[int, ...], tokens: list[int],
                conf: torch.Tensor) -> None:
        r = work.request
        if len(positions) == 1:
            chosen = [0]  # every rule commits at least one position: no choice to make
        else:
            chosen = sorted(set(self.commit_rule(conf, r.params, work.window[1] - work.window[0]).tolist()))
        self._apply(work, [positions[i] for i in chosen], [tokens[i] for i in chosen], len(positions))

    def _apply(self, work: RequestWork, positions: list[int], tokens: list[int], open_before: int) -> None:
        """Commit ``tokens`` at ``positions`` (ascending, at least one) of ``work``'s window,
        which held ``open_before`` masked positions (the step's logit rows for it).
        Only what the next step's plan reads happens now; the request's statistics and commit
        events wait for :meth:`account` (after the next launch, while the device computes)."""
        r = work.request
        canvas, committed = r.tokens, r.committed
        for pos, token in zip(positions, tokens):
            canvas[pos] = token
            committed[pos] = True
        r.last_committed = n = len(positions)
        r.open_after = open_before - n
        self._unaccounted.append(([work], positions, tokens, [n], self.step_index))

    def account(self, engine_stats: EngineStats) -> None:
        """Statistics and commit events of the commits made since the last call, and the
        engine's statistics of the steps completed since (``record_later``): before any output
        is built."""
        engine_stats.catch_up()
        if not self._unaccounted:
            return
        pending, self._unaccounted = self._unaccounted, []
        for works, positions, tokens, ends, step in pending:
            a = 0
            for work, b in zip(works, ends):
                r, (lo, hi) = work.request, work.window
                n, c = b - a, hi - lo
                stats = r.stats
                stats.steps += 1
                stats.chunk_history.append(c)
                stats.tokens_committed += n
                stats.chunk_sizes[c] = stats.chunk_sizes.get(c, 0) + 1
                stats.committed_per_chunk[c] = stats.committed_per_chunk.get(c, 0) + n
                start = r.geometry.canvas_start
                r.events.append(CommitEvent(step, lo - start, hi - start, tuple([p - start for p in positions[a:b]]),
                                            tuple(tokens[a:b])))
                a = b

    # ---- report ------------------------------------------------------------------------
    def output(self, r: Request, text: str | None = None) -> RequestOutput:
        """``r``'s output now (the caller runs :meth:`account` first); ``text`` given: that
        text, nothing detokenized."""
        extend_answer(r, r.output_len)
        ids = TokenIds(r.answer, r.output_len)  # the list only grows
        if text is None:
            text = self._output_text(r, ids)
        events, r.events = tuple(r.events), []
        return RequestOutput(r.request_id, r.prompt_ids, ids, text, r.is_done, r.finish_reason,
                             r.stats, events)

    def _output_text(self, r: Request, ids: TokenIds) -> str:
        if r.done_text:
            return r.done_text
        if not r.is_done and not self.stream_text:
            return ""  # offline callers read text once, when the request finishes
        if r.is_done and r.detokenizer is None:
            skip = r.params.skip_special_tokens
            return self.tokenizer.decode(ids, skip_special_tokens=skip) if self.final_text else ""
        text = self.settler.text(r, ids)
        return hold_back_stop_prefix(text, r.params.stop) if r.params.stop and not r.is_done else text


class _ParamsOf(Sequence):
    """The works' requests' SamplingParams [n], listed at the first read (a replayed acceptance
    never reads them: a list of 256 would be built for nothing every step)."""

    def __init__(self, works: list[RequestWork]) -> None:
        self.works = works
        self._params: list[SamplingParams] | None = None

    def _listed(self) -> list[SamplingParams]:
        if self._params is None:
            self._params = [w.request.params for w in self.works]
        return self._params

    def __len__(self) -> int:
        return len(self.works)

    def __getitem__(self, i):
        return self._listed()[i]

    def __iter__(self):
        return iter(self._listed())
