"""Acceptance regimes: named acceptance profiles that benchmarks replay (``--acceptance NAME``).

A regime says how many positions a decoding step commits, by chunk size and by masked
positions in the window (the ``by_chunk`` + ``by_open`` format of ``optimus bench acceptance``,
replayed by :class:`optimus.decoding.replay.ReplayAcceptance` unchanged).

- ``tasks``: the shipped 22M model measured on its held-out copy/sort/arithmetic tasks
  (benchmarks/results/cpu/acceptance/latest.json): very confident, 12.4 commits per step at C = 32.
- ``prose``: the same model measured on free-form prose continuations and chat prompts with
  ShareGPT-like output lengths (benchmarks/prompts/acceptance_prose.jsonl;
  benchmarks/results/cpu/acceptance_prose/latest.json).
- ``smollm2-prose``: the shipped block-diffusion SmolLM2-135M (``smollm2-135m-dllm``, block 4)
  measured on the 100 open prose prompts of the chat300 set under its chat template, at most
  256 tokens each, on an H200 (``src/optimus/default_dllm/tau_profile.json``): a real converted
  chat model on free prose, 1.28 commits per step at C = 2 and 1.46 at C >= 4 (its block).
- ``real-8b``: :class:`DistanceDecay`, a parametric family calibrated to the published
  tokens-per-forward of real 8B-class dLLMs under threshold decoding at block 32:

  * LLaDA2.0-mini: 2.55 tokens per forward, averaged over 12 benchmarks (knowledge,
    reasoning, coding, math), and 3.72 for its confidence-aware-trained variant
    LLaDA2.0-mini-CAP (model card of inclusionAI/LLaDA2.0-mini-CAP, "Performance Comparison").
  * dParallel (Chen et al., 2025, arXiv 2509.26488): LLaDA-8B-Instruct needs 256 steps for
    256 tokens (1 per step) without certainty-forcing distillation; the distilled model
    takes 30 steps on GSM8K (8.5 per step) and 24 on MBPP: what parallel decoding reaches only
    after training for it, the upper edge of the range, not the default.
  * An H200 run of the SDAR-8B shape under a real-like profile (window tau 1 / 1.24 / 1.56 /
    1.89 / 2.27 / 2.68 at C = 1 ... 32) fixes the shape between C = 2 and C = 32.

  ``real-8b`` is calibrated to window tau 1.24 at C = 2 and 2.55 at C = 32 (the LLaDA2.0-mini
  average); the sizes between follow from the model.

The model of ``real-8b``: a window with ``m`` masked positions, at distances 1..m from the
decoded context (confidence-ordered commits leave the masked positions farthest from context
for last, so the ones left are again the near ones). The nearest always commits (a step
commits at least one); the one at distance ``d >= 2`` passes the threshold independently with
probability ``p * r**(d - 2)``: the farther from decoded context, the less sure. Commits per
step: ``1 + Binomial-sum``; the histograms are its exact Poisson-binomial distribution.
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from optimus.decoding.replay import Acceptance, load_acceptance

ROOT = Path(__file__).resolve().parents[3]
RESULTS = ROOT / "benchmarks" / "results" / "cpu"
STORED = {"tasks": RESULTS / "acceptance" / "latest.json", "prose": RESULTS / "acceptance_prose" / "latest.json",
          "smollm2-prose": Path(__file__).resolve().parents[1] / "default_dllm" / "tau_profile.json"}
REGIMES = ("tasks", "prose", "smollm2-prose", "real-8b")
CHUNKS = (1, 2, 4, 8, 16, 32)

# Calibration of ``real-8b``: window tau at C = 2 (the real-like H200 profile) and at C = 32
# (LLaDA2.0-mini, 2.55 tokens per forward averaged over 12 benchmarks at block 32).
REAL_8B_TARGET = {2: 1.24, 32: 2.55}
STEPS_PER_BUCKET = 10_000  # histogram counts per masked count (the distribution, rounded)


@dataclass(frozen=True)
class DistanceDecay:
    """Commits per step given ``m`` masked positions: 1 + sum over d = 2..m of independent
    Bernoulli(p r^(d-2)). ``p``: the chance the second-nearest position passes; ``r``: the
    decay per position of distance."""

    p: float
    r: float

    def pass_probs(self, m: int) -> np.ndarray:
        """[m - 1] pass probabilities of the positions at distances 2..m."""
        return self.p * self.r ** np.arange(max(m - 1, 0))

    def commit_distribution(self, m: int) -> np.ndarray:
        """[m + 1] probability of committing k = 0..m positions in a window with m masked."""
        dist = np.zeros(m + 1)
        dist[1] = 1.0  # the nearest position: always
        for q in self.pass_probs(m):
            dist[1:] = dist[1:] * (1 - q) + dist[:-1] * q
        return dist

    def window_tau(self, chunks=CHUNKS) -> dict[int, float]:
        """C / expected steps to clear a fully masked window of C (what a replay shows)."""
        top = max(chunks)
        steps = np.zeros(top + 1)
        for m in range(1, top + 1):
            dist = self.commit_distribution(m)
            steps[m] = 1.0 + sum(dist[k] * steps[m - k] for k in range(1, m + 1))
        return {c: c / steps[c] for c in chunks}

    def profile(self, chunks=CHUNKS, per_bucket: int = STEPS_PER_BUCKET) -> dict:
        """The regime in ``bench acceptance`` format (histograms, by_open, tau_per_chunk)."""
        by_open, hists = {}, {}
        for c in chunks:
            per = {}
            for m in range(1, c + 1):
                counts = np.round(self.commit_distribution(m) * per_bucket).astype(int)
                per[str(m)] = {str(k): int(n) for k, n in enumerate(counts) if n > 0}
            by_open[str(c)] = per
            hists[str(c)] = per[str(c)]  # a full window's steps (the by_chunk fallback)
        tau = self.window_tau(chunks)
        return {"regime": "real-8b", "model": f"DistanceDecay(p={self.p:.4f}, r={self.r:.4f})",
                "calibration": {str(c): t for c, t in REAL_8B_TARGET.items()},
                "tau_per_chunk": {str(c): tau[c] for c in chunks}, "histograms": hists, "by_open": by_open}


def calibrate(target: dict[int, float] = REAL_8B_TARGET) -> DistanceDecay:
    """The (p, r) whose window tau meets ``target`` ({2: tau2, C: tauC}). A window of two
    takes 1 + (1 - p) steps, so ``p = 2 - 2 / tau2`` exactly; tau(C) rises with ``r``, so
    bisection finds ``r``."""
    (c2, tau2), (big, tau_big) = sorted(target.items())
    if c2 != 2 or not 1.0 < tau2 < 2.0 or not tau2 < tau_big < big:
        raise ValueError(f"calibration needs {{2: tau in (1, 2), C: larger tau < C}}, got {target}")
    p = 2.0 - 2.0 / tau2
    lo, hi = 0.0, 0.999
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if DistanceDecay(p, mid).window_tau((big,))[big] < tau_big else (lo, mid)
    return DistanceDecay(p, (lo + hi) / 2)


def real_8b_profile() -> dict:
    return calibrate().profile()


def resolve(spec: str) -> Path:
    """A regime name or an acceptance-profile path -> a profile file (``real-8b`` is written
    to a temporary file, generated afresh: deterministic)."""
    if spec in STORED:
        if not STORED[spec].exists():
            raise FileNotFoundError(f"acceptance regime {spec!r}: {STORED[spec]} is missing (a source checkout has it)")
        return STORED[spec]
    if spec == "real-8b":
        out = Path(tempfile.gettempdir()) / "optimus_acceptance_real-8b.json"
        out.write_text(json.dumps(real_8b_profile(), indent=1))
        return out
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--acceptance {spec!r}: neither a regime ({', '.join(REGIMES)}) nor a file")
    return path


def load(spec: str) -> Acceptance:
    return _load_regime(spec) if spec in REGIMES else load_acceptance(resolve(spec))


@functools.lru_cache(maxsize=None)
def _load_regime(name: str) -> Acceptance:
    """A named regime, read (or generated) once per process: simulations load it per run."""
    return load_acceptance(resolve(name))
