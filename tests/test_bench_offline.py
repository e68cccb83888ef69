"""The offline benchmark's code path, shrunk to tiny shapes on the CPU (no timing asserted)."""

import json

from optimus.cli import main


def test_bench_offline_tiny_smoke(tmp_path):
    acc = tmp_path / "acceptance.json"
    acc.write_text(json.dumps({"distribution": {"1": [1], "8": [2, 3], "32": [4, 6]}}))
    out = tmp_path / "offline.json"
    rc = main(["bench", "offline", "--device", "cpu", "--tiny", "--experiments", "schedule4,sweep",
               "--batches", "2", "--concurrency", "1,3", "--policies", "ar,fixed:8,elastic",
               "--acceptance", str(acc), "--profile", str(tmp_path / "profile.json"), "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    row = data["schedule4"][0]
    assert row["output_tokens"] == 2 * 256 and row["tokens_committed"] == 2 * 256
    assert row["steps"] >= 256 // 4  # 4 committed per step at most
    assert {r["policy"] for r in data["sweep"]} == {"ar", "fixed:8", "elastic"}
    ar = next(r for r in data["sweep"] if r["policy"] == "ar" and r["concurrency"] == 1)
    assert ar["steps"] >= 256  # one token per step
    assert (tmp_path / "policy_sweep.png").stat().st_size > 0
