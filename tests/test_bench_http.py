"""``optimus bench http`` pieces on CPU: the in-process closed loop keeps N requests in flight
and counts every answer token, and rows become a table and a plot. (The whole command, server
included, is run by hand: docs/server.md "Measuring it".)"""

from __future__ import annotations

from optimus.bench.closed_loop import run_closed_loop
from optimus.bench.http_vs_engine import plot, prompts_for, table, warm_up
from optimus.config import engine_config
from optimus.core.params import SamplingParams
from optimus.engine.engine import Engine


def test_closed_loop_serves_every_prompt_with_n_in_flight(tiny_checkpoint, tmp_path):
    engine = Engine(engine_config(model=str(tiny_checkpoint("sdar")), device="cpu", num_pages=64, policy="fixed:4"))
    seen, ran = [], []
    step = engine.step

    def counting_step():
        seen.append(len(engine.scheduler.running) + len(engine.scheduler.waiting))
        before = engine.stats.steps
        outputs = step()
        ran.append(engine.stats.steps - before)  # 0: a call that only reported the last step's news
        return outputs

    engine.step = counting_step
    row = run_closed_loop(engine, prompts_for(7, 5, engine.spec.arch.vocab_size, seed=0),
                          SamplingParams(max_tokens=6, ignore_eos=True), concurrency=3)
    assert row["requests"] == 7 and row["output_tokens"] == 7 * 6 and row["steps"] == sum(ran) > 0
    assert max(seen) == 3 and row["output_tok_s"] > 0 and row["p99_ttft_ms"] >= row["p50_ttft_ms"] > 0
    assert engine.post.stream_text  # detokenizing every output, as a server does
    rows = [{"policy": "fixed:4", "concurrency": 3, "inprocess": row,
             "http": {**row, "output_tok_s": row["output_tok_s"] / 2, "failed": 0}, "http_over_engine": 0.5}]
    assert "0.500" in table(rows).splitlines()[1]
    assert plot(rows, tmp_path / "p.png").stat().st_size > 0


def test_warm_up_repeats_waves_until_one_captures_nothing():
    captures = {1: 0.8, 2: 0.2, 3: 0.0, 4: 0.0}
    ran = []

    def wave(k):
        ran.append(k)
        return captures[k]

    assert warm_up(wave, max_waves=5) == 3 and ran == [1, 2, 3]
    ran.clear()
    assert warm_up(wave, max_waves=2) == 2 and ran == [1, 2]  # capped, though wave 2 still captured
    ran.clear()
    assert warm_up(wave, max_waves=0) == 0 and ran == []
