"""What crosses the boundary between the engine process and the HTTP front-ends.

Transport: ZeroMQ over ``ipc://`` sockets (the engine binds one PULL socket per life, every
front-end PUSHes requests into it; each front-end binds one PULL socket the engine PUSHes to).
Encoding: msgpack lists, one frame per message. The hot message is ``STEP``: ONE per front-end
per engine step, carrying every one of its streams' new tokens and finish states, so a step
costs the engine one small encode and one send per front-end however many streams it holds.
Rare messages whose payload is a rich Python object (the model's spec and tokenizer at start,
forwarded method calls and their results) carry it pickled inside the frame.

Every engine-to-front-end message starts ``[kind, epoch]``: a restarted engine process has a new
epoch, and a front-end drops anything of an earlier one.
"""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass
from typing import Any

import msgpack

from optimus.core.outputs import CommitEvent, RequestStats
from optimus.core.params import SamplingParams
from optimus.engine.model_facts import ModelFacts
from optimus.engine.stats import EngineMetrics

# front-end -> engine
ADD = 0  # [ADD, frontend, handle, prompt_ids, params (non-default fields), group, events]
ABORT = 1  # [ABORT, frontend, [handle, ...]]
CALL = 2  # [CALL, frontend, call_id, method, pickled (args, kwargs)]
# engine -> front-end
READY = 10  # [READY, epoch, pickled EngineInfo]
STEP = 11  # [STEP, epoch, [[handle, base, new_token_ids, finish_reason, extra], ...]]
METRICS = 12  # [METRICS, epoch, EngineMetrics fields]
REPLY = 13  # [REPLY, epoch, call_id, ok, pickled result or exception]

# ``extra`` of a STEP item (None when empty): stats at finish, commit events when asked for,
# the refusal of an add ("queue_full" | "invalid" | "failed", message).
STATS, EVENTS, REFUSED = "s", "e", "r"


@dataclass(frozen=True)
class EngineInfo(ModelFacts):
    """A loaded engine's model facts, and its KV pages and process."""

    num_pages: int
    page_size: int
    pid: int


def pack(message: list) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(frame: bytes) -> list:
    return msgpack.unpackb(frame, raw=False, strict_map_key=False)


def dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Any:
    return pickle.loads(data)


_PARAM_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingParams)}


def params_to_wire(params: SamplingParams) -> dict:
    """Only the fields that differ from their defaults (most requests set two or three)."""
    out = {}
    for name, default in _PARAM_DEFAULTS.items():
        value = getattr(params, name)
        if value != default:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def params_from_wire(fields: dict) -> SamplingParams:
    return SamplingParams(**fields)


def stats_to_wire(stats: RequestStats) -> dict:
    return dataclasses.asdict(stats)


def stats_into(stats: RequestStats, fields: dict) -> None:
    """Update the front-end's copy of a request's stats in place."""
    for name, value in fields.items():
        setattr(stats, name, value)


def events_to_wire(events: tuple[CommitEvent, ...]) -> list:
    return [[e.step, e.chunk_start, e.chunk_end, list(e.positions), list(e.token_ids)] for e in events]


def events_from_wire(events: list) -> list[CommitEvent]:
    return [CommitEvent(s, a, b, tuple(p), tuple(t)) for s, a, b, p, t in events]


def metrics_to_wire(m: EngineMetrics) -> list:
    return [getattr(m, f.name) for f in dataclasses.fields(EngineMetrics)]


def metrics_from_wire(values: list) -> EngineMetrics:
    return EngineMetrics(*values)
