"""A device curve from a GPU sweep's step traces, for the emulated device
(``engine.emulated.EmulatedDevice``) to replay on a CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

from optimus.policy.elastic.latency import LatencyProfile


def sweep_rows(paths) -> list[dict]:
    """The rows of ``optimus bench offline`` sweep JSON files (``sweep``), one file after another."""
    return [row for path in paths for row in json.loads(Path(path).read_text())["sweep"]]


def profile_from_traces(rows: list[dict]) -> LatencyProfile:
    """A device curve from measured steps: the ``step_trace`` of ``optimus bench offline``'s
    sweep rows (a GPU run), one point per step with a device time, its batch the step's request
    count rounded to a power of two (so each batch's curve has points enough). An emulated
    device built on it replays that card's step times on a CPU, where a controller change can
    be tried before a GPU is free."""
    pairs = [(n, ms / 1e3, 2 ** round(math.log2(k)))
             for row in rows if row.get("step_trace")
             for n, k, ms in zip(row["step_trace"]["rows"], row["step_trace"]["requests"],
                                 row["step_trace"]["device_ms"]) if ms > 0 and k > 0]
    if not pairs:
        raise ValueError("no step traces with device times (sweep rows of `optimus bench offline`)")
    return LatencyProfile.from_pairs(pairs, source="step traces")


def main(argv: list[str] | None = None) -> int:
    """``python -m optimus.bench.step_traces SWEEP_JSON OUT_JSON``: the card's step curve from
    a GPU sweep's traces, saved for ``optimus serve --emulate-device``."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("sweep", help="sweep JSON of `optimus bench offline` (rows with step_trace)")
    p.add_argument("out", help="latency profile JSON to write")
    a = p.parse_args(argv)
    path = profile_from_traces(sweep_rows([a.sweep])).save(a.out)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
