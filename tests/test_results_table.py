"""scripts/results_table.py: docs/results.md is generated from benchmarks/results/<card>/<benchmark>/latest.json."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rt():
    spec = importlib.util.spec_from_file_location("results_table", ROOT / "scripts" / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _put(results: Path, card: str, bench: str, data: dict, source: str | None = "2026-01-02 abc1234", plots=()):
    folder = results / card / bench
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "latest.json").write_text(json.dumps(data))
    if source:
        (folder / "latest.source").write_text(source + "\n")
    for name in plots:
        (folder / name).write_bytes(b"\x89PNG")
    return folder


def _offline(b1: float, ar1: float) -> dict:
    return {"device": "fake GPU",
            "schedule4": [{"shape": "llada-8b", "policy": "fixed:32", "batch": 1, "output_tok_s": b1,
                           "schedule": "4 tokens/step"}],
            "ar": [{"shape": "llama-8b", "policy": "ar", "batch": 1, "output_tok_s": ar1}]}


def _sweep() -> dict:
    rows = []
    for n, vals in ((1, {"ar": 140.0, "fixed:8": 900.0, "fixed:32": 2400.0, "elastic": 2376.0}),
                    (16, {"ar": 1800.0, "fixed:8": 7900.0, "fixed:32": 9800.0, "elastic": 9996.0}),
                    (256, {"ar": 8500.0, "fixed:8": 5200.0, "fixed:32": 2600.0, "elastic": 8400.0})):
        rows += [{"policy": p, "concurrency": n, "shape": "sdar-8b", "acceptance": "replayed", "output_tok_s": v}
                 for p, v in vals.items()]
    return {"device": "fake GPU", "sweep": rows, "surface": {"knee_tokens": 168.4}}


def _table(text: str, heading: str) -> list[str]:
    """The markdown table rows under ``## heading``."""
    block = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return [ln for ln in block.splitlines() if ln.startswith("|")]


def test_tables_per_benchmark_with_a_column_per_card(rt, tmp_path):
    results, out = tmp_path / "benchmarks" / "results", tmp_path / "docs" / "results.md"
    _put(results, "h100", "offline_table", _offline(505.14, 160.81))
    _put(results, "h100", "policy_sweep", _sweep(), plots=("latest.png", "latest_latency_surface.png"))
    (results / "h100" / "gpu.txt").write_text("name, memory.total [MiB], driver_version\nFake H100, 80 GiB, 1.0\n")
    _put(results, "cpu", "serve_sweep_text", {
        "rates": [1.0, 2.0], "slo_ms": {"ttft": 1000.0, "tpot": 100.0}, "attainment_target": 0.9,
        "dataset": {"name": "text", "num_prompts": 24},
        "policies": {p: {"capacity": cap, "runs": [{"request_rate": r, "output_throughput": t, "slo_attainment": a}
                                                    for r, t, a in runs]}
                     for p, cap, runs in (("ar", 2.0, ((1.0, 19.0, 1.0), (2.0, 37.0, 1.0))),
                                          ("fixed:8", 1.0, ((1.0, 20.0, 1.0), (2.0, 30.0, 0.5))),
                                          ("elastic", 2.0, ((1.0, 19.5, 1.0), (2.0, 36.0, 0.95))))}},
         source="2026-01-01 def5678")
    text = rt.render(results, out)

    offline = _table(text, "Engine throughput at 8B shapes")
    assert offline[0] == "| | H100 | H200 |"  # the H200 column is there before any H200 result
    assert offline[2] == ("| **source** | [2026-01-02 abc1234](../benchmarks/results/h100/offline_table/latest.json)"
                          " | not measured yet |")
    assert "| LLaDA-8B 4 tokens/step prefix-block, batch 1 (tok/s) | 505 | not measured yet |" in offline
    assert "| Llama-8B AR, batch 1 (tok/s) | 161 | not measured yet |" in offline

    sweep = _table(text, "Policies across concurrency (offline)")
    assert ("| 1 request: elastic vs best single policy (tok/s) | 2,376 vs 2,400 (fixed:32): 99.0% "
            "| not measured yet |") in sweep
    assert ("| 16 requests: elastic vs best single policy (tok/s) | 9,996 vs 9,800 (fixed:32): 102.0% "
            "| not measured yet |") in sweep
    # ar is a single policy too: where it is the best, elastic is held to it
    assert ("| 256 requests: elastic vs best single policy (tok/s) | 8,400 vs 8,500 (ar): 98.8% "
            "| not measured yet |") in sweep
    assert ("| sum over concurrencies: elastic vs best single policy (tok/s) | 20,772 vs 14,800 (fixed:32): "
            "140.4% | not measured yet |") in sweep
    assert "| latency knee (tokens per step) | 168 | not measured yet |" in sweep
    assert "(../benchmarks/results/h100/policy_sweep/latest_latency_surface.png)" in text

    cpu = _table(text, "Serving the default model: prose continuation")
    assert cpu[0] == "| | CPU |"  # a CPU-only benchmark gets no GPU columns
    assert "2026-01-01 def5678" in cpu[2]
    # served, too, elastic is held to the best single policy, ar included (here ar beats every fixed size)
    assert "| 2 req/s: elastic vs best single policy (output tok/s) | 36.0 vs 37.0 (ar): 97.3% |" in cpu
    assert "| capacity of ar (req/s) | >= 2 (top rate); SLO attainment 100 / 100% |" in cpu
    assert "| capacity of fixed:8 (req/s) | 1; SLO attainment 100 / 50% |" in cpu

    cards = text.split("| card | device |", 1)[1].split("\n\n", 1)[0]
    assert "| H100 | Fake H100, 80 GiB, 1.0 |" in cards and "| H200 | not measured yet |" in cards


def test_a_new_card_gains_its_column_and_unknown_benchmarks_are_listed(rt, tmp_path):
    results, out = tmp_path / "results", tmp_path / "docs" / "results.md"
    _put(results, "h100", "offline_table", _offline(505.0, 161.0))
    _put(results, "h200", "offline_table", _offline(640.0, 210.0), source="2026-02-03 0123abc")
    _put(results, "h200", "brand_new", {"x": 1}, source=None)
    text = rt.render(results, out)
    offline = _table(text, "Engine throughput at 8B shapes")
    assert "| LLaDA-8B 4 tokens/step prefix-block, batch 1 (tok/s) | 505 | 640 |" in offline
    assert "[2026-02-03 0123abc](../results/h200/offline_table/latest.json)" in offline[2]
    new = _table(text, "brand new")
    assert new[0] == "| | H100 | H200 |"
    assert new[2] == "| **source** | not measured yet | [no latest.source](../results/h200/brand_new/latest.json) |"
    assert "present (no summary for this benchmark)" in new[3]


def test_check_mode_and_writing(rt, tmp_path):
    results, out = tmp_path / "results", tmp_path / "docs" / "results.md"
    _put(results, "h100", "offline_table", _offline(505.0, 161.0))
    assert rt.main(["--results", str(results), "--out", str(out), "--check"]) == 1  # not written yet
    assert rt.main(["--results", str(results), "--out", str(out)]) == 0
    assert rt.main(["--results", str(results), "--out", str(out), "--check"]) == 0
    _put(results, "h100", "offline_table", _offline(600.0, 161.0), source="2026-03-04 fedcba9")
    assert rt.main(["--results", str(results), "--out", str(out), "--check"]) == 1


def test_store_moves_the_latest_run_to_history_by_date_and_commit(rt, tmp_path):
    results = tmp_path / "results"
    folder = _put(results, "h100", "policy_sweep", _sweep(), source="2026-01-02 abc1234",
                  plots=("latest.png", "latest_latency_surface.png"))
    new_json, new_plot, new_surface = tmp_path / "policy_sweep.json", tmp_path / "policy_sweep.png", tmp_path / "latency_surface.png"
    new_json.write_text(json.dumps(_sweep()))
    new_plot.write_bytes(b"new"), new_surface.write_bytes(b"new surface")
    rt.store(results, "h100", "policy_sweep", [new_json, new_plot, new_surface], "2026-02-01 1111111")
    assert sorted(p.name for p in (folder / "history").iterdir()) == [
        "2026-01-02_abc1234.json", "2026-01-02_abc1234.png", "2026-01-02_abc1234_latency_surface.png"]
    assert (folder / "latest.png").read_bytes() == b"new"
    assert (folder / "latest_latency_surface.png").read_bytes() == b"new surface"
    assert (folder / "latest.source").read_text() == "2026-02-01 1111111\n"
    with pytest.raises(ValueError):  # the same source twice would overwrite history
        (folder / "latest.source").write_text("2026-01-02 abc1234\n")
        rt.store(results, "h100", "policy_sweep", [new_json], "2026-02-02 2222222")


def test_docs_results_md_is_up_to_date_with_the_committed_results(rt):
    """Regenerating docs/results.md from benchmarks/results gives the committed text."""
    assert (ROOT / "docs" / "results.md").read_text() == rt.render(rt.RESULTS, rt.OUT), \
        "docs/results.md is stale: run python scripts/results_table.py"


def test_every_result_folder_has_a_latest_and_its_source(rt):
    """benchmarks/results/<card>/<benchmark>/ holds latest.json + latest.source; older runs sit in
    history/ as <date>_<commit>[_variant].<ext>."""
    import re

    folders = [p for p in rt.RESULTS.glob("*/*") if p.is_dir()]
    assert folders
    for folder in folders:
        assert (folder / "latest.json").exists(), folder
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2} [0-9a-f]{7,}\n", (folder / "latest.source").read_text()), folder
        for old in (folder / "history").glob("*") if (folder / "history").exists() else []:
            assert re.match(r"\d{4}-\d{2}-\d{2}_[0-9a-f]{7}(_[a-z0-9_]+)?[._]", old.name), old
    names = [str(p.relative_to(rt.RESULTS)) for p in rt.RESULTS.rglob("*")]
    assert not [n for n in names if re.search(r"session|phase|_final", n)], "name by date, commit and what differs"


def test_a_policy_left_out_of_higher_loads_is_named_and_the_sum_compares_the_rest(rt):
    d = _sweep()
    d["sweep"] = [r for r in d["sweep"] if not (r["policy"] == "fixed:32" and r["concurrency"] == 256)]
    rows = dict(rt.policy_sweep(d))
    # without fixed:32's 256-request point, the sum is over ar, fixed:8 and elastic alone
    assert rows["sum over concurrencies: elastic vs best single policy (tok/s); fixed:32 not run at every load"] == \
        "20,772 vs 14,000 (fixed:8): 148.4%"
    assert rows["256 requests: elastic vs best single policy (tok/s)"] == "8,400 vs 8,500 (ar): 98.8%"
