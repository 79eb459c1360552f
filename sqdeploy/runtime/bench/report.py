"""Benchmark reports: tables with ratios to the first variant, JSON, Markdown and plots in one directory."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from sqdeploy.core.report import markdown_table, write_json_atomic


def machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _ms(v: float | None) -> str:
    return "" if v is None else f"{1000 * v:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "" if not a or not b else f"{a / b:.2f}x"


def offline_table(results: list[dict]) -> str:
    """One row per variant and grid point; tokens/s and TPOT also as ratios to the first variant."""
    first = {(r["batch_size"], r["input_len"], r["output_len"]): r for r in results[0]["rows"]}
    rows = []
    for v in results:
        for r in v["rows"]:
            base = first.get((r["batch_size"], r["input_len"], r["output_len"]))
            rows.append(
                [
                    v["label"],
                    r["batch_size"],
                    r["input_len"],
                    r["output_len"],
                    _ms(r["ttft_s"]),
                    _ms(r["tpot_s"]),
                    f"{r['e2e_s']:.2f}",
                    f"{r['tokens_per_s']:.1f}",
                    _ratio(r["tokens_per_s"], base and base["tokens_per_s"]),
                    _ratio(r["tpot_s"], base and base["tpot_s"]),
                    f"{v['peak_rss_mib']:.0f}",
                ]
            )
    return markdown_table(
        [
            "variant",
            "batch",
            "input",
            "output",
            "TTFT ms",
            "TPOT ms",
            "e2e s",
            "tokens/s",
            "tokens/s vs first",
            "TPOT vs first",
            "peak RSS MiB",
        ],
        rows,
    )


def online_table(points: list[dict]) -> str:
    def p3(d: dict, scale: float = 1000.0, fmt: str = "{:.1f}") -> str:
        return "/".join("" if d[k] is None else fmt.format(scale * d[k]) for k in ("p50", "p90", "p99"))

    rows = [
        [
            p["label"],
            p["requests"],
            p["failed"],
            p.get("rejected", 0),
            f"{p['request_throughput']:.2f}",
            f"{p['output_throughput']:.1f}",
            p3(p["ttft_s"]),
            p3(p["itl_s"]),
            p3(p["e2e_s"], 1.0, "{:.2f}"),
            _engine_split(p.get("engine")),
        ]
        for p in points
    ]
    return markdown_table(
        [
            "load",
            "requests",
            "failed",
            "rejected (429)",
            "req/s",
            "output tokens/s",
            "TTFT p50/p90/p99 ms",
            "ITL p50/p90/p99 ms",
            "e2e p50/p90/p99 s",
            "server engine steps/delivering/idle",
        ],
        rows,
    )


def _engine_split(e: dict | None) -> str:
    """The served engine's worker time over the point (sq-serve only): idle is time it waited for requests."""
    if not e or "step_fraction" not in e:
        return ""
    return "/".join(f"{100 * e.get(k, 0.0):.0f}%" for k in ("step_fraction", "deliver_fraction", "idle_fraction"))


def write_report(out: Path, kind: str, data: dict, markdown: str, plots: list[str]) -> None:
    """``report.json``, ``report.md`` (with the plots inline) and the PNGs already in ``out``."""
    write_json_atomic(out / "report.json", {"kind": kind, **data})
    images = "\n".join(f"![{Path(p).stem}]({Path(p).name})" for p in plots)
    (out / "report.md").write_text(markdown + ("\n\n" + images if images else "") + "\n")
