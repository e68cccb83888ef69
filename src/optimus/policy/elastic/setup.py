"""Wires the elastic policy to this device: the saved latency profile for (device, model),
re-checked at each start against a few fresh step timings and re-measured when it is off,
or a brief one measured on first start; the log says which, and where it came from. Plus
an optional tau prior."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from optimus.decoding import regimes
from optimus.decoding.replay import load_acceptance
from optimus.policy.elastic.graph_buckets import GraphBuckets, eager_cell

log = logging.getLogger(__name__)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{torch.get_num_threads()}threads"


def model_id(engine) -> str:
    """Family, name and dtype, and ``-fp8`` when projections are kept in FP8 (their steps cost
    differently: each keeps its own profile)."""
    path = Path(str(getattr(engine.loaded, "path", engine.spec.family)))
    params = list(engine.loaded.model.parameters())
    fp8 = "-fp8" if any(p.dtype == torch.float8_e4m3fn for p in params) else ""
    return f"{engine.spec.family}-{path.name}-{str(params[0].dtype).removeprefix('torch.')}{fp8}"


BRIEF_CONTEXT = 64  # cached positions per request in the steps a start-up profile measures


def _brief_grid(max_running: int, device: torch.device, block: int) -> tuple[list[int], list[int]]:
    """Batch sizes and chunk sizes a start-up profile times: no chunk wider than the model's
    block (a block-4 model never runs one), fewer batches off the GPU (each CPU step is slow)."""
    batches = [b for b in (1, 4, 16, 64, 256) if b <= max(1, max_running)]
    if device.type != "cuda":
        batches = batches[:3]
    return batches, sorted({c for c in (1, 4, 16, 32) if c < block} | {min(block, 32)})


def eager_cells(engine, batches: list[int], max_tokens: int | None = None) -> list[tuple[int, int]]:
    """One step just past the largest CUDA graph, if steps of its size can run (at most
    ``max_tokens``; None: the engine's step budget). It runs eagerly: the cliff the policy must
    see (graph_buckets.py). None without graphs."""
    buckets = GraphBuckets.of(getattr(engine, "runner", None))
    cell = None if buckets is None else eager_cell(buckets.limit, batches)
    if cell is None:
        return []
    limit = engine.config.scheduler.max_tokens_per_step if max_tokens is None else max_tokens
    return [cell] if cell[0] * cell[1] <= limit else []


def load_or_profile(engine):
    """The latency profile the elastic policy plans with. A profile named by
    ``--profile-path`` is the user's choice: re-checked and warned about, never replaced. The
    cached one is re-measured when its steps are off by more than the tolerance."""
    from optimus.policy.elastic.latency import default_profile_path

    dev = device_name(engine.device)
    given = engine.config.profile_path
    path = Path(given) if given else default_profile_path(dev, model_id(engine))
    cached = _read_cached(path, given=bool(given))
    if cached is not None and _still_valid(engine, cached, path, dev, given=bool(given)):
        return with_routing(cached, engine.spec)
    return _measure_brief(engine, path, dev, model_id(engine))


def with_routing(profile, spec):
    """``profile`` planning with the model's expert routing (an MoE model's step cost follows
    the experts it touches); a profile saved without one gains it, a dense model's is unchanged."""
    from optimus.policy.elastic.experts import ExpertRouting

    routing = ExpertRouting.of(spec)
    return profile if routing is None or profile.routing == routing else dataclasses.replace(profile, routing=routing)


def _read_cached(path: Path, given: bool):
    """The profile at ``path``, or None when there is none; an unreadable cache entry is
    measured again (it is only a cache), an unreadable named file is an error."""
    from optimus.policy.elastic.latency import LatencyProfile

    if not path.exists():
        return None
    try:
        return LatencyProfile.load(path)
    except (ValueError, KeyError, TypeError) as exc:
        if given:
            raise
        log.warning("latency profile %s is unreadable (%s): measuring a new one", path, exc)
        return None


def _still_valid(engine, profile, path: Path, dev: str, given: bool) -> bool:
    """Log which profile is used and why; False when it must be measured again."""
    from optimus.policy.elastic.profiler import recheck_profile
    from optimus.executor.timed_step import make_step_fn

    if profile.device != dev:  # a synthetic curve or another machine's, named on purpose
        log.info("latency profile: %s (%s); not re-checked: it is not from this device (%s)",
                 path, profile.describe(), dev)
        return True
    try:
        check = recheck_profile(profile, make_step_fn(engine, context=profile.context or BRIEF_CONTEXT))
    except ValueError as exc:  # e.g. its steps' context does not fit this engine's KV cache
        log.warning("latency profile: %s (%s); could not re-check it (%s): using it as is",
                    path, profile.describe(), exc)
        return True
    if check.holds():
        log.info("latency profile: %s (%s); re-checked at start: %s", path, profile.describe(), check.describe())
        return True
    if given:
        log.warning("latency profile %s (%s) does not match this device now: %s; using it anyway, as "
                    "--profile-path names it ('optimus profile --force --out %s' re-measures it)",
                    path, profile.describe(), check.describe(), path)
        return True
    log.warning("cached latency profile %s (%s) does not match this device now: %s; re-measuring",
                path, profile.describe(), check.describe())
    return False


def _measure_brief(engine, path: Path, dev: str, mid: str):
    from optimus.policy.elastic.profiler import grid_cells, profile_latency
    from optimus.executor.timed_step import make_step_fn

    batches, chunks = _brief_grid(engine.config.scheduler.max_running, engine.device, engine.block_size)
    extra = eager_cells(engine, batches)
    log.info("latency profile: measuring %d steps of %s on %s for the elastic policy (once: saved to %s "
             "and re-checked at each start; 'optimus profile' measures a fuller grid)",
             len(grid_cells(batches, chunks)) + len(extra), mid, dev, path)
    profile = profile_latency(make_step_fn(engine, context=BRIEF_CONTEXT), batches, chunks, warmup=1,
                              repeats=3, progress=True, extra_cells=extra)
    profile = with_routing(dataclasses.replace(profile, device=dev, model_id=mid, context=BRIEF_CONTEXT,
                                               source="start-up"), engine.spec)
    try:
        profile.save(path)
    except OSError as exc:
        log.warning("could not save the latency profile: %s", exc)
    log.info("latency profile: %s (%s)", path, profile.describe())
    return profile


def tau_prior_from(path: str | Path | None) -> dict[int, float] | None:
    """Mean commits per step per chunk size from a measured acceptance profile, if there is
    one: with ``by_open`` (a profile a benchmark replays), the commits per step of a window
    that starts full under that replay; else its ``tau_per_chunk`` table (as `optimus eval`
    writes it); else the means of its observations (see :func:`load_acceptance`). ``path``
    may name an acceptance regime (``tasks``, ``prose``, ``real-8b``: decoding/regimes.py)."""
    if path and str(path) in regimes.REGIMES:
        path = regimes.resolve(str(path))
    if not path or not Path(path).exists():
        return None
    data = json.loads(Path(path).read_text())
    if data.get("by_open"):
        return load_acceptance(path).window_tau()
    if "tau_per_chunk" in data:
        return {int(c): float(v) for c, v in data["tau_per_chunk"].items()}
    return {c: sum(obs) / len(obs) for c, obs in load_acceptance(path).by_chunk.items()}


def elastic_kwargs(engine) -> dict:
    """The device's latency profile, and a tau prior: the config's acceptance profile, else
    the profile whose commits the engine replays (``replay_acceptance``: the tau elastic will
    actually see), else the one shipped beside the model (``tau_profile.json``), else none
    (learned online); and the CUDA-graph buckets the runner replays (graph_buckets.py)."""
    config = engine.config
    model_dir = Path(str(getattr(engine.loaded, "path", "")))
    prior = (tau_prior_from(config.acceptance_profile) or tau_prior_from(config.replay_acceptance)
             or tau_prior_from(model_dir / "tau_profile.json"))
    return {"profile": load_or_profile(engine), "tau_prior": prior, "per_request": config.scheduler.elastic_per_request,
            "graph_buckets": GraphBuckets.of(getattr(engine, "runner", None))}
