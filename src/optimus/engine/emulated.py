"""An emulated accelerator for benchmarks without the card: steps queue on it and take the time
a latency profile says, while the host runs on. Benchmarks attach one to an engine they built;
``--emulate-device PROFILE`` makes any engine (``optimus serve`` included) build one (:func:`emulate`).

``EmulatedDevice.attach(engine)`` replaces the runner's forward and greedy pick: a forward
enqueues the step (it starts when the device finishes the step before, or now) and returns at
once; the pick's ``read`` sleeps until just before the step's end and spins the rest (sleeping
holds no interpreter lock, like waiting on a CUDA event; the short spin keeps a sleep's
overshoot out); the engine's device timer reads the emulated start and end. The engine then
overlaps host work with "device" work exactly as it would on a GPU, so a CPU can
measure how much of the host's work a schedule hides: wall time against device busy time.
The tokens are random, as in ``optimus bench host``; every request must be greedy.

The forward's hidden rows are one value wide by default: on a GPU, taking a step's logit rows
out of them is a kernel launch, while rows of the model's width would make it a copy on the
host (256 x 4,096 floats a step for the 8B shape: device work counted as host time).
"""

from __future__ import annotations

import time

import torch

from optimus.executor.runner import GreedyPick
from optimus.policy.elastic.latency import LatencyProfile


# The last part of a wait spins: a sleep overshoots its end by about 0.1 ms (at times by
# milliseconds) on a shared machine, which a wait on a CUDA event does not.
SPIN_S = 3e-4


class _EmulatedPick(GreedyPick):
    def __init__(self, tokens: torch.Tensor, conf: torch.Tensor, ready_at: float) -> None:
        super().__init__(tokens, conf)
        self.ready_at = ready_at

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        wait = self.ready_at - time.perf_counter()
        if wait > SPIN_S:
            time.sleep(wait - SPIN_S)
        while time.perf_counter() < self.ready_at:
            pass
        return super().read()


class _EmulatedTime:
    """The engine's ``DeviceTime`` interface over the emulated step just enqueued."""

    def __init__(self, device: "EmulatedDevice") -> None:
        self.device = device
        self.span = (0.0, 0.0)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.span = self.device.last_span

    @property
    def seconds(self) -> float:
        return self.span[1] - self.span[0]

    def gap_after(self, earlier: "_EmulatedTime") -> float | None:
        return max(0.0, self.span[0] - earlier.span[1])


def emulate(engine, profile_path: str) -> "EmulatedDevice":
    """``EngineConfig.emulate_device``: the engine's steps take a stored surface's times."""
    return EmulatedDevice(LatencyProfile.load(profile_path), engine.tokenizer.vocab_size).attach(engine)


class EmulatedDevice:
    """Steps take ``profile.predict(tokens, requests)`` seconds, one after another; no time
    at all without a profile (the device left out: host work alone)."""

    def __init__(self, profile: LatencyProfile | None, vocab: int, hidden: int = 1, seed: int = 0) -> None:
        self.profile, self.vocab, self.hidden = profile, vocab, hidden
        self.gen = torch.Generator().manual_seed(seed)
        self.free_at = 0.0  # perf_counter time the queued work ends
        self.busy_s = 0.0  # device time enqueued so far
        self.last_span = (0.0, 0.0)  # (start, end) of the latest step
        self._zeros = torch.zeros(0, hidden)

    def attach(self, engine) -> "EmulatedDevice":
        engine.runner.forward, engine.runner.greedy = self.forward, self.greedy
        engine.device_timer = lambda: _EmulatedTime(self)
        return self

    def forward(self, batch) -> torch.Tensor:
        rows = batch.input_ids.shape[0]
        seconds = 0.0 if self.profile is None else self.profile.predict(rows, batch=max(1, batch.cache_lens.shape[0]))
        start = max(time.perf_counter(), self.free_at)
        self.free_at = start + seconds
        self.busy_s += seconds
        self.last_span = (start, self.free_at)
        if self._zeros.shape[0] < rows:  # a view of one buffer: the stand-in costs no host time
            self._zeros = torch.zeros(rows, self.hidden)
        return self._zeros[:rows]

    def greedy(self, hidden: torch.Tensor, rows_per_pass: int = 1024) -> GreedyPick:
        m = hidden.shape[0]
        return _EmulatedPick(torch.randint(100, self.vocab - 100, (m,), generator=self.gen),
                             torch.rand(m, generator=self.gen), self.free_at)
