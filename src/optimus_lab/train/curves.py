"""Plot a training log (``train_log.json``) as loss curves: training loss and held-out text loss
against tokens seen."""

from __future__ import annotations

import json
from pathlib import Path


def plot_curves(log_path: Path, png_path: Path, title: str = "default model: block-diffusion training") -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = json.loads(log_path.read_text())
    rows = log["log"]
    train = [(r["tokens"] / 1e6, r["loss"]) for r in rows if "loss" in r]
    per_step_tokens = train[-1][0] / next(r["step"] for r in reversed(rows) if "loss" in r) if train else 0
    key = next((k for k in ("heldout_loss", "heldout_text_loss") if any(k in r for r in rows)), None)
    val = [(r["step"] * per_step_tokens, r[key]) for r in rows if key in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="training loss (1/t-weighted, text + chat)")
    if val:
        ax.plot(*zip(*val), "o-", label="held-out rows: CE per masked token")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("nats")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return {"train": train, "heldout": val}
