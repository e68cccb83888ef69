"""Decoding configurations the harness compares, behind one small interface.

``reference``: the published SDAR block-diffusion loop (``optimus.reference.sdar``) at C = block,
threshold decoding, one prompt at a time. ``ar`` / ``fixed:C`` / ``elastic``: the engine with
that chunk policy. Every decoder returns, per prompt, the answer ids (up to the first stop id)
and the (chunk size, tokens committed) pair of each of its denoising steps.
"""

from __future__ import annotations

import time

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from optimus.core.params import SamplingParams


@dataclass(frozen=True)
class Decoded:
    token_ids: tuple[int, ...]
    steps: tuple[tuple[int, int], ...]  # (chunk size, committed) per denoising step


class Decoder(Protocol):
    name: str

    def decode(self, prompts: Sequence[list[int]]) -> list[Decoded]: ...

    def close(self) -> None:
        """Give back what decoding holds (an engine's KV cache and graphs)."""


def _until_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> tuple[int, ...]:
    out = []
    for t in ids:
        if t in stop_ids:
            break
        out.append(int(t))
    return tuple(out)


class ReferenceDecoder:
    """SDAR reference at C = block. Its per-step commits are not exposed, so each block's
    steps are recorded as one (block, committed/denoise-steps) average per request."""

    def __init__(self, loaded, max_tokens: int, threshold: float) -> None:
        self.name, self.loaded = "reference", loaded
        self.max_tokens, self.threshold = max_tokens, threshold

    def close(self) -> None:
        pass

    def _overhead(self, prompt_len: int, answer: list[int]) -> int:
        """Forwards that commit nothing: the prompt prefill and one K/V store per decoded block
        (the loop stops after the block holding the first stop id)."""
        b, eos = self.loaded.spec.block_size, self.loaded.spec.eos_ids
        stop = next((i for i, t in enumerate(answer) if t in eos), len(answer) - 1)
        blocks = (prompt_len + stop) // b - prompt_len // b + 1
        return blocks + (1 if prompt_len >= b else 0)

    def decode(self, prompts: Sequence[list[int]]) -> list[Decoded]:
        from optimus.reference.sdar import block_diffusion_generate
        spec, out = self.loaded.spec, []
        for prompt in prompts:
            res = block_diffusion_generate(self.loaded.model, torch.tensor([prompt]), gen_length=self.max_tokens,
                                           confidence_threshold=self.threshold, stop_ids=spec.eos_ids)
            answer = res.sequence[0, res.prompt_length:].tolist()
            denoise_steps = max(1, res.stats.steps - self._overhead(len(prompt), answer))
            per_step = res.stats.tokens / denoise_steps
            out.append(Decoded(_until_stop(answer, spec.eos_ids),
                               ((spec.block_size, round(per_step)),) * denoise_steps))
        return out


class EngineDecoder:
    """The engine under one chunk policy; steps come from its per-step commit events."""

    def __init__(self, loaded, policy: str, max_tokens: int, threshold: float, device: str) -> None:
        from optimus.engine.llm import LLM
        self.name = policy
        self.llm = LLM(loaded=loaded, policy=policy, device=device)
        self.params = SamplingParams(max_tokens=max_tokens, temperature=0.0, threshold=threshold)

    def close(self) -> None:
        self.llm.engine.close()

    def decode(self, prompts: Sequence[list[int]]) -> list[Decoded]:
        engine = self.llm.engine
        ids = [f"eval-{id(self)}-{i}" for i in range(len(prompts))]
        for rid, prompt in zip(ids, prompts):
            engine.add_request(rid, list(prompt), self.params)
        steps = {rid: [] for rid in ids}
        final = {}
        while len(final) < len(ids):
            for out in engine.step():
                steps[out.request_id].extend((e.chunk_end - e.chunk_start, len(e.positions)) for e in out.events)
                if out.finished:
                    final[out.request_id] = out
            if not engine.has_work() and len(final) < len(ids):
                raise RuntimeError("engine went idle with requests unfinished")
        return [Decoded(tuple(final[r].token_ids), tuple(steps[r])) for r in ids]


def make_decoder(name: str, loaded, max_tokens: int, threshold: float, device: str) -> Decoder:
    if name == "reference":
        return ReferenceDecoder(loaded, max_tokens, threshold)
    return EngineDecoder(loaded, name, max_tokens, threshold, device)


def decode_all(name: str, loaded, prompts: Sequence[list[int]], max_tokens: int, threshold: float, device: str,
               batch: int) -> tuple[list[Decoded], float]:
    """Every prompt under one decoding config, ``batch`` at a time: (decoded, seconds)."""
    decoder = make_decoder(name, loaded, max_tokens, threshold, device)
    start, decoded = time.perf_counter(), []
    try:
        for i in range(0, len(prompts), batch):
            decoded.extend(decoder.decode(prompts[i:i + batch]))
    finally:
        decoder.close()
    return decoded, time.perf_counter() - start
