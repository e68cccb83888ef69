"""``optimus bench host``: the host work of a step at many requests with the device left out."""

from __future__ import annotations

import json

from optimus.bench.host_time import PHASES, measure
from optimus.cli import main


def test_host_bench_times_every_phase_of_full_batch_steps():
    row = measure("fixed:4", "sdar-8b", requests=8, prompt_len=32, output_len=32, acceptance="real-8b")
    ms = row["full_batch_ms"]
    assert row["full_batch_steps"] > 0 and set(ms) == {"total", "critical", *PHASES}
    assert all(ms[k] > 0 for k in PHASES)
    assert ms["total"] >= 0.9 * sum(ms[k] for k in PHASES)  # the phases run inside the step
    assert ms["critical"] < ms["total"]  # the policy's learning is off the critical path
    # real-8b commits 1.5-1.6 tokens per window of 4: 8 requests commit about 12 a step
    assert 8 <= row["tokens_per_step"] <= 8 * 4


def test_host_bench_command_saves_its_rows(tmp_path, capsys):
    out = tmp_path / "host.json"
    assert main(["bench", "host", "--requests", "4", "--prompt-len", "16", "--output-len", "16",
                 "--policies", "ar", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["rows"][0]["policy"] == "ar" and saved["rows"][0]["tokens_per_step"] <= 4
    assert "ms/step at a full batch" in capsys.readouterr().out
