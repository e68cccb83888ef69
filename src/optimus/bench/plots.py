"""PNG plots of a sweep (the dict :func:`optimus.bench.sweep.run_sweep` returns): throughput,
p99 latency and SLO attainment against the request rate, one line per policy; each policy's
capacity is marked (a star on its line and a dotted vertical in its colour)."""

from __future__ import annotations

from pathlib import Path

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
# Distinct markers and dashes keep coinciding lines (e.g. several policies at 100%) visible.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")
DASHES = ("-", "--", "-.", ":", "-", "--", "-.", ":")


def plot_sweep(sweep: dict, out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")  # files only; never a display
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_throughput(sweep, out_dir / "throughput_vs_rate.png"),
            _latency(sweep, out_dir / "p99_latency_vs_rate.png"),
            _attainment(sweep, out_dir / "slo_attainment_vs_rate.png")]


def _series(sweep: dict):
    """(policy, style, rates, runs, capacity) per policy, in sweep order; style holds the
    line's colour, marker and dashes."""
    for i, (policy, res) in enumerate(sweep["policies"].items()):
        runs = res["runs"]
        style = {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)],
                 "linestyle": DASHES[i % len(DASHES)], "markersize": 8 - i % 4, "linewidth": 1.6}
        yield policy, style, [r["request_rate"] for r in runs], runs, res["capacity"]


def _mark_capacity(ax, rates, values, cap, style) -> None:
    if cap is None:
        return
    ax.axvline(cap, color=style["color"], linestyle=":", linewidth=1)
    ax.plot([cap], [values[rates.index(cap)]], marker="*", markersize=16, color=style["color"],
            markeredgecolor="black", linestyle="none", alpha=0.8)


def _throughput(sweep: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, style, rates, runs, cap in _series(sweep):
        y = [r["output_throughput"] for r in runs]
        ax.plot(rates, y, label=_label(policy, cap), **style)
        _mark_capacity(ax, rates, y, cap, style)
    _finish(ax, "output throughput (tok/s)", "Throughput vs request rate (star = capacity under SLO)")
    return _save(fig, path)


def _latency(sweep: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    slo = sweep.get("slo_ms", {})
    for ax, metric, title in ((axes[0], "ttft", "p99 TTFT"), (axes[1], "tpot", "p99 TPOT")):
        for policy, style, rates, runs, cap in _series(sweep):
            y = [r[f"p99_{metric}_ms"] for r in runs]
            ax.plot(rates, y, label=_label(policy, cap), **style)
            _mark_capacity(ax, rates, y, cap, style)
        if metric in slo:
            ax.axhline(slo[metric], color="black", linestyle="--", linewidth=1, label=f"SLO {slo[metric]:g} ms")
        ax.set_yscale("log")
        _finish(ax, f"{title} (ms, log scale)", f"{title} vs request rate")
    return _save(fig, path)


def _attainment(sweep: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, style, rates, runs, cap in _series(sweep):
        y = [100.0 * (r["slo_attainment"] or 0.0) for r in runs]
        ax.plot(rates, y, label=_label(policy, cap), **style)
        _mark_capacity(ax, rates, y, cap, style)
    target = 100.0 * sweep.get("attainment_target", 0.9)
    ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"{target:g}% target")
    ax.set_ylim(-3, 103)
    slo = ", ".join(f"{k} <= {v:g} ms" for k, v in sweep.get("slo_ms", {}).items())
    _finish(ax, "requests within SLOs (%)", f"SLO attainment vs request rate ({slo})")
    return _save(fig, path)


def _label(policy: str, cap: float | None) -> str:
    return f"{policy} (capacity {cap:g} req/s)" if cap is not None else f"{policy} (capacity < swept rates)"


def _finish(ax, ylabel: str, title: str) -> None:
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
