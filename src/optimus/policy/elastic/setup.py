"""Wires the elastic policy to this device: load the saved latency profile for (device,
model), or measure a brief one on first start (and say so), plus an optional tau prior."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from optimus.decoding.replay import load_acceptance

log = logging.getLogger(__name__)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{torch.get_num_threads()}threads"


def model_id(engine) -> str:
    path = Path(str(getattr(engine.loaded, "path", engine.spec.family)))
    dtype = next(engine.loaded.model.parameters()).dtype
    return f"{engine.spec.family}-{path.name}-{str(dtype).removeprefix('torch.')}"


def _brief_grid(max_running: int, device: torch.device) -> tuple[list[int], list[int]]:
    batches = [b for b in (1, 4, 16, 64, 256) if b <= max(1, max_running)]
    if device.type != "cuda":
        batches = batches[:3]
    return batches, [1, 4, 16, 32]


def load_or_profile(engine):
    from optimus.policy.elastic.latency import LatencyProfile, default_profile_path

    dev = device_name(engine.device)
    path = Path(engine.config.profile_path) if engine.config.profile_path else default_profile_path(dev, model_id(engine))
    if path.exists():
        return LatencyProfile.load(path)
    from optimus.policy.elastic.profiler import profile_latency
    from optimus.executor.timed_step import make_step_fn

    batches, chunks = _brief_grid(engine.config.scheduler.max_running, engine.device)
    log.warning("no latency profile for %s on %s: profiling briefly (%d points), saving to %s",
                model_id(engine), dev, len(batches) * len(chunks), path)
    profile = profile_latency(make_step_fn(engine, context=64), batches, chunks, warmup=1, repeats=3,
                              progress=False)
    profile = dataclasses.replace(profile, device=dev, model_id=model_id(engine))
    try:
        profile.save(path)
    except OSError as exc:
        log.warning("could not save the latency profile: %s", exc)
    return profile


def tau_prior_from(path: str | Path | None) -> dict[int, float] | None:
    """Mean commits per step per chunk size from a measured acceptance profile, if there is
    one: with ``by_open`` (a profile a benchmark replays), the commits per step of a window
    that starts full under that replay; else its ``tau_per_chunk`` table (as `optimus eval`
    writes it); else the means of its observations (see :func:`load_acceptance`)."""
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
    (learned online)."""
    config = engine.config
    model_dir = Path(str(getattr(engine.loaded, "path", "")))
    prior = (tau_prior_from(config.acceptance_profile) or tau_prior_from(config.replay_acceptance)
             or tau_prior_from(model_dir / "tau_profile.json"))
    return {"profile": load_or_profile(engine), "tau_prior": prior,
            "per_request": config.scheduler.elastic_per_request}
