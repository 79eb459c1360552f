"""PNG plots a person reads at a glance: variants side by side (offline), latency against throughput (online)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def offline_bars(results: list[dict], path: Path) -> Path:
    """Throughput, TTFT, TPOT per grid point (one bar per variant) and peak memory per variant."""
    plt = _plt()
    points = [(r["batch_size"], r["input_len"], r["output_len"]) for r in results[0]["rows"]]
    names = [f"bs{b} in{i} out{o}" for b, i, o in points]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    width = 0.8 / len(results)
    x = np.arange(len(points))
    panels = [
        (axes[0, 0], "tokens_per_s", 1.0, "output tokens/s (higher is better)"),
        (axes[0, 1], "ttft_s", 1000.0, "time to first token, ms (lower is better)"),
        (axes[1, 0], "tpot_s", 1000.0, "time per output token, ms (lower is better)"),
    ]
    for ax, key, scale, title in panels:
        for k, v in enumerate(results):
            by = {(r["batch_size"], r["input_len"], r["output_len"]): r for r in v["rows"]}
            vals = [scale * (by[p][key] or 0.0) if p in by else 0.0 for p in points]
            bars = ax.bar(x + (k - (len(results) - 1) / 2) * width, vals, width, label=v["label"])
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(x, names, rotation=20 if len(points) > 3 else 0, fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    ax = axes[1, 1]
    bars = ax.bar(
        [v["label"] for v in results], [v["peak_rss_mib"] for v in results], color=[f"C{k}" for k in range(len(results))]
    )
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_title("peak resident memory, MiB (lower is better)")
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle("sq-bench offline: variants side by side")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def online_curves(points: list[dict], path: Path, breakdown: float | None = None) -> Path:
    """TTFT, inter-token and end-to-end latency percentiles against achieved output throughput, one marker per load."""
    plt = _plt()
    pts = sorted(points, key=lambda p: p["output_throughput"])
    x = [p["output_throughput"] for p in pts]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), constrained_layout=True)
    for ax, key, scale, title in (
        (axes[0], "ttft_s", 1000.0, "time to first token, ms"),
        (axes[1], "itl_s", 1000.0, "inter-token latency, ms"),
        (axes[2], "e2e_s", 1.0, "end-to-end latency, s"),
    ):
        for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(x, [scale * (p[key][q] or np.nan) for p in pts], style, label=q)
        for p, xv in zip(pts, x):
            ax.annotate(p["label"], (xv, scale * (p[key]["p50"] or 0)), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("output tokens/s (achieved)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    note = f"latency breaks down at {breakdown:g} req/s" if breakdown else "no breakdown within the measured rates"
    fig.suptitle(f"sq-bench online: latency vs throughput ({note})")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def overhead_bars(results: list[dict], path: Path) -> Path:
    """Offline and served throughput per engine, each round as a dot over the median bar."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 2.5 * len(results)), 4.5), constrained_layout=True)
    x = np.arange(len(results))
    for k, (key, label) in enumerate((("offline_tokens_per_s", "offline"), ("served_tokens_per_s", "sq-serve"))):
        med = [float(np.median(r[key])) for r in results]
        bars = ax.bar(x + (k - 0.5) * 0.4, med, 0.4, label=label, color=f"C{k}")
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        for i, r in enumerate(results):
            ax.plot([x[i] + (k - 0.5) * 0.4] * len(r[key]), r[key], "k.", alpha=0.5)
    ax.set_xticks(
        x, [f"{Path(r['path']).name}\nserved {100 * r['served_vs_offline']:.0f}% of offline" for r in results], fontsize=8
    )
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"sq-serve vs offline at batch {results[0]['config']['batch']} (dots: rounds)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
