"""The eval runner: held-out task sets x decoding configurations -> accuracy, tau, text loss."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from optimus_lab.evaluation.decoders import decode_all
from optimus_lab.evaluation.scoring import score, summarise_tau
from optimus_lab.evaluation.tasks import Example, heldout_set

DEFAULT_CONFIGS = ("reference", "fixed:1", "fixed:2", "fixed:4", "fixed:8", "fixed:16", "fixed:32",
                   "elastic", "ar")


@dataclass(frozen=True)
class EvalSpec:
    tasks: tuple[str, ...]
    configs: tuple[str, ...]
    limit: int  # held-out examples per task
    max_tokens: int = 64
    threshold: float = 0.9
    device: str = "cpu"
    batch: int = 32  # prompts given to the engine at once


def _prompts(loaded, examples: Sequence[Example]) -> list[list[int]]:
    tok = loaded.tokenizer
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": ex.question}],
                                               add_generation_prompt=True)) for ex in examples]


def run_config(loaded, name: str, examples: list[Example], prompts: list[list[int]], spec: EvalSpec) -> dict:
    decoded, seconds = decode_all(name, loaded, prompts, spec.max_tokens, spec.threshold, spec.device, spec.batch)
    texts = [loaded.tokenizer.decode(list(d.token_ids)) for d in decoded]
    scores = score(examples, texts)
    steps = [s for d in decoded for s in d.steps]
    correct = sum(s.correct for s in scores.values())
    return {"accuracy": round(correct / len(examples), 4) if examples else 0.0,
            "tasks": {t: s.as_dict() for t, s in sorted(scores.items())},
            "tau": summarise_tau(steps).as_dict(), "seconds": round(seconds, 2),
            "samples": [{"q": ex.question, "expected": ex.answer, "got": txt}
                        for ex, txt in list(zip(examples, texts))[:3]]}


def run_eval(loaded, spec: EvalSpec, heldout_rows: Path | None = None, log=print, save=None) -> dict:
    """``save(result)`` is called after every configuration, so a late failure keeps the rest."""
    examples = [ex for task in spec.tasks for ex in heldout_set(task, spec.limit)]
    prompts = _prompts(loaded, examples)
    result = {"model": str(loaded.path), "limit": spec.limit, "threshold": spec.threshold,
              "max_tokens": spec.max_tokens, "configs": {}}
    for name in spec.configs:
        result["configs"][name] = run_config(loaded, name, examples, prompts, spec)
        r = result["configs"][name]
        log(f"{name:>10}: accuracy {r['accuracy']:.3f}  tau {r['tau']['mean']:.2f}  ({r['seconds']:.1f}s)  "
            + " ".join(f"{t}={s['accuracy']:.2f}" for t, s in r["tasks"].items()))
        if save is not None:
            save(result)
    if heldout_rows is not None and heldout_rows.exists():
        from optimus_lab.evaluation.text_loss import heldout_text_loss
        result["heldout_text_loss"] = heldout_text_loss(loaded, heldout_rows)
        log(f"held-out text loss: {result['heldout_text_loss']:.4f} nats per masked token")
    return result


def tau_profile(result: dict) -> dict:
    """{chunk size: mean tokens committed per step} from the ``fixed:C`` runs, plus histograms:
    the measured acceptance profile benchmarks replay."""
    profile, hist = {}, {}
    for name, r in result["configs"].items():
        if name.startswith("fixed:"):
            c = name.split(":", 1)[1]
            profile[c] = r["tau"]["per_chunk"].get(c, r["tau"]["mean"])
            hist[c] = r["tau"]["per_chunk_histogram"].get(c, r["tau"]["histogram"])
    return {"model": result["model"], "threshold": result["threshold"], "tau_per_chunk": profile,
            "histograms": hist}


def merge_profiles(profiles: Sequence[dict], model: str) -> dict:
    """Step-weighted merge of several ``tau_profile`` results (e.g. arithmetic and other tasks)."""
    sums, steps, hist = {}, {}, {}
    for p in profiles:
        for c, h in p["histograms"].items():
            n = sum(h.values())
            steps[c] = steps.get(c, 0) + n
            sums[c] = sums.get(c, 0.0) + p["tau_per_chunk"][c] * n
            merged = hist.setdefault(c, {})
            for k, v in h.items():
                merged[k] = merged.get(k, 0) + v
    return {"model": model, "threshold": profiles[0]["threshold"],
            "tau_per_chunk": {c: round(sums[c] / steps[c], 4) for c in sorted(sums, key=int) if steps[c]},
            "histograms": hist}
