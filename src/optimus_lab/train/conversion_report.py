"""One result file and one plot for a SmolLM2 -> block-diffusion conversion run.

Reads what ``scripts/gpu/convert_smollm2.sh`` leaves in its results folder (``selfchat.json``'s
last line, ``sweep.json``) and one folder per trained model (``train_log.json``, ``chat300.json``
from ``optimus eval --suite chat``, ``acceptance.json`` from ``optimus bench acceptance``), and
writes the summary the results table shows: the block sweep, each run's chat300 row against the
AR base, its tokens per step by chunk size, and the targets (docs/default_model.md) met or missed.

  python -m optimus_lab.train.conversion_report RESULTS --run main=DIR [--run NAME=DIR ...] \\
      --shipped NAME --out latest.json --plot latest.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# The targets a converted default model is held to (docs/default_model.md), all against the AR
# base on the 300 chat prompts, greedy, at the default threshold.
TARGETS = {"accuracy_points": -3.0, "nll_ratio": 1.3, "rep4_ratio": 1.2, "length_ratio": (0.8, 1.2), "tau": 2.0}


def _last_json_line(path: Path) -> dict:
    lines = [line for line in path.read_text().splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def chat_row(chat: dict, config: str) -> dict:
    """The chat300 numbers of one decoding config, against the AR base."""
    r = chat["configs"][config]
    vs = r.get("vs_ar", {})
    prose = [{"prompt": x["prompt"], "answer": x["answer"]} for x in r["samples"].get("prose", [])[:3]]
    return {"accuracy": r["accuracy"], "prose": r["prose"], "tau": r["tau"]["mean"], "vs_ar": vs, "prose_samples": prose}


def targets_met(row: dict) -> dict:
    vs, t = row["vs_ar"], TARGETS
    lo, hi = t["length_ratio"]
    return {"accuracy_within_3_points": all(vs[f"{k}_points"] >= t["accuracy_points"] for k in ("arithmetic", "factual")),
            "nll_ratio_at_most_1.3": vs["nll_ratio"] <= t["nll_ratio"],
            "rep4_ratio_at_most_1.2": vs["rep4_ratio"] <= t["rep4_ratio"],
            "length_within_20_percent": lo <= vs["length_ratio"] <= hi,
            "tau_at_least_2": row["tau"] >= t["tau"]}


def run_summary(folder: Path) -> dict:
    log = json.loads((folder / "train_log.json").read_text())
    chat = json.loads((folder / "chat300.json").read_text())
    configs = {name: chat_row(chat, name) for name in chat["configs"] if name != "ar"}
    out = {"train": {**log["summary"], "batch_size": int(log["config"]["batch_size"]), "lr": float(log["config"]["lr"]),
                     "heldout_curve": [(r["step"], round(r["heldout_loss"], 4)) for r in log["log"] if "heldout_loss" in r]},
           "chat300": configs, "targets": {n: targets_met(r) for n, r in configs.items()}}
    if (folder / "acceptance.json").exists():
        acc = json.loads((folder / "acceptance.json").read_text())
        out["tau_by_chunk_prose"] = {c: round(v, 3) for c, v in acc["tau_per_chunk"].items()}
    return out


def report(results: Path, runs: dict[str, Path], shipped: str | None) -> dict:
    base_chat = json.loads(next(iter(runs.values())).joinpath("chat300.json").read_text())
    out = {"experiment": "smollm2_conversion", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF) -> sdar, LoRA",
           "selfchat": _last_json_line(results / "selfchat.json"),
           "ar_base_chat300": chat_row(base_chat, "ar"), "targets": TARGETS,
           "runs": {name: run_summary(folder) for name, folder in runs.items()}, "shipped": shipped}
    if (results / "sweep.json").exists():
        sweep = json.loads((results / "sweep.json").read_text())
        out["sweep"] = {"picked": sweep["picked"], "rule": sweep["rule"],
                        "rows": {b: {k: v for k, v in r.items() if k != "samples"} for b, r in sweep["rows"].items()}}
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, tau_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, run) in enumerate(summary["runs"].items()):
        color = f"C{i}"  # one colour per run in both panels
        tokens_per_step = run["train"]["tokens"] / max(1, run["train"]["steps"])
        curve = run["train"]["heldout_curve"]
        if curve:
            loss_ax.plot([s * tokens_per_step / 1e6 for s, _ in curve], [v for _, v in curve], marker="o", color=color,
                         label=name)
        if "tau_by_chunk_prose" in run:
            chunks = sorted(run["tau_by_chunk_prose"], key=int)
            tau_ax.plot([int(c) for c in chunks], [run["tau_by_chunk_prose"][c] for c in chunks], marker="o",
                        color=color, label=name)
    loss_ax.set(xlabel="training tokens (M)", ylabel="held-out loss (self-chat)", title="held-out loss")
    tau_ax.axhline(TARGETS["tau"], color="grey", linestyle="--", label="target")
    tau_ax.set(xscale="log", xlabel="chunk size C", ylabel="tokens per step", title="chat300 open prose, threshold 0.9")
    tau_ax.set_xticks([1, 2, 4, 8, 16, 32], labels=["1", "2", "4", "8", "16", "32"])
    for ax in (loss_ax, tau_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m optimus_lab.train.conversion_report")
    p.add_argument("results", help="the results folder of scripts/gpu/convert_smollm2.sh")
    p.add_argument("--run", action="append", required=True, help="NAME=FOLDER of a trained model's files")
    p.add_argument("--shipped", default=None, help="the run shipped as the default dLLM")
    p.add_argument("--out", required=True)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    runs = dict(item.split("=", 1) for item in args.run)
    summary = report(Path(args.results), {k: Path(v) for k, v in runs.items()}, args.shipped)
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    if args.plot:
        plot(summary, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
