"""PNG plots of an `optimus bench offline` JSON: the latency surface and the policy sweep."""

from __future__ import annotations

import json
from pathlib import Path


def plot_offline(json_path: str | Path, out_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(json_path).read_text())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = data.get("device", "?")
    written = []
    if "surface" in data:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        pts = data["surface"]["points"]
        for chunk in sorted({p["chunk"] for p in pts}):
            row = sorted((p for p in pts if p["chunk"] == chunk), key=lambda p: p["tokens"])
            ax.plot([p["tokens"] for p in row], [1e3 * p["seconds"] for p in row], "o-", label=f"chunk {chunk}")
        ax.axvline(data["surface"]["knee_tokens"], color="grey", ls="--", label=f"knee ~{data['surface']['knee_tokens']:.0f}")
        ax.set(xscale="log", xlabel="tokens per step (batch x chunk)", ylabel="step latency (ms)",
               title=f"{data['surface']['shape']} step latency, cache {data['surface']['context']} ({device})")
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / "latency_surface.png"))
    if "sweep" in data:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        rows = data["sweep"]
        for policy in dict.fromkeys(r["policy"] for r in rows):
            pr = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["concurrency"])
            ax.plot([r["concurrency"] for r in pr], [r["output_tok_s"] for r in pr], "o-", label=policy,
                    lw=2.5 if policy == "elastic" else 1.2)
        ax.set(xscale="log", xlabel="concurrency (requests)", ylabel="output tokens / s",
               title=f"{rows[0]['shape']}, acceptance {rows[0].get('acceptance', 'replayed')} ({device})")
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / "policy_sweep.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
