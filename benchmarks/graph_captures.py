"""Which CUDA-graph buckets a served load meets, counted on the CPU (no GPU needed).

    PYTHONPATH=src python benchmarks/graph_captures.py --out /tmp/captures

A closed loop of ``--streams`` ar requests on a tiny random SDAR model: each finished request
is replaced by one arriving 0 to ``--spread`` steps later (as HTTP clients' next requests do;
0 = together, as the in-process bench), for ``--waves`` x streams requests. A stand-in graph
pool (the real ``GraphedBody.fits`` rule, eager forwards) counts each new bucket a step would
capture, per wave, how many of those steps carried a prompt piece, and the steps run eagerly,
for ``--graph-capture all`` and ``decode``. Writes ``graph_captures.json``."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from optimus.core.params import SamplingParams
from optimus.engine.llm import LLM
from optimus.executor.cuda_graphs import GraphedBody


class CountingBody(GraphedBody):
    """Records the buckets it would capture; runs every step eagerly."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.captures: list[bool] = []  # per new bucket: whether its step carried a prompt
        self.replays = 0  # steps that fit a graph

    def run(self, batch):
        self.replays += 1
        key = self.key(batch)
        if key not in self.graphs:
            self.graphs[key] = None
            self.captures.append(batch.carries_prompt)
        return self._body(batch)


def count(args, spread: int, rule: str) -> dict:
    llm = LLM("random-tiny:sdar-8b", policy="ar", device="cpu", num_pages=4096, page_size=16,
              max_running=args.streams)
    engine = llm.engine
    body = CountingBody(engine.runner.model, engine.storage, "torch", 512, args.streams, 64,
                        capture_prompt_steps=rule == "all")
    engine.runner.graphs = body
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    total = args.waves * args.streams
    arrivals = [0] * args.streams  # the step each next request arrives at
    sent = finished = step = 0
    per_wave = []
    while finished < total:
        due = [a for a in arrivals if a <= step]
        arrivals = [a for a in arrivals if a > step]
        for _ in due:
            engine.add_request(str(sent), [rng.randrange(100, 200) for _ in range(args.input_len)], params)
            sent += 1
        for out in engine.step():
            if not out.finished:
                continue
            finished += 1
            if finished % args.streams == 0:
                per_wave.append(len(body.captures) - sum(per_wave))
            if sent + len(arrivals) < total:
                arrivals.append(step + 1 + rng.randint(0, spread))
        step += 1
    return {"spread": spread, "graph_capture": rule, "captures_per_wave": per_wave,
            "captures": len(body.captures), "carrying_prompt": sum(body.captures), "steps": engine.stats.steps,
            "eager_steps": engine.stats.steps - body.replays}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--waves", type=int, default=4)
    p.add_argument("--input-len", type=int, default=48, help="prompt tokens (SDAR blocks are 32)")
    p.add_argument("--output-len", type=int, default=24)
    p.add_argument("--spread", type=int, default=5, help="most steps a next request arrives late")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = [count(args, spread, rule) for spread in (0, args.spread) for rule in ("all", "decode")]
    for r in rows:
        print(f"arrivals spread 0-{r['spread']} steps, --graph-capture {r['graph_capture']:6s}: new buckets per wave "
              f"{r['captures_per_wave']}, {r['carrying_prompt']} of {r['captures']} in steps carrying a prompt; "
              f"{r['eager_steps']} of {r['steps']} steps eager")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "graph_captures.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
