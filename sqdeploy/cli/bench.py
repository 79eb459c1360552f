"""sq-bench: offline (engine only) and online (HTTP, OpenAI-compatible) latency and throughput reports."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from pathlib import Path

from sqdeploy.cli.common import run_cli
from sqdeploy.core.errors import SqDeployError


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _rates(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated rates (req/s, 'inf' for all at once), got {text!r}") from None
    if not vals or min(vals) <= 0:
        raise argparse.ArgumentTypeError(f"rates must be > 0, got {text!r}")
    return vals


def _kv_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache-gib", type=float, default=None, help="kernel backend: KV cache size in GiB")
    p.add_argument("--gpu-memory-fraction", type=float, default=None,
                   help="kernel backend: share of the GPU's memory for model and KV cache (default 0.9)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sq-bench", description=__doc__)
    sub = ap.add_subparsers(dest="mode", required=True)
    off = sub.add_parser("offline", help="engine directories side by side: TTFT, TPOT, latency, tokens/s, peak memory")
    off.add_argument("engine_dirs", nargs="+", help="engine or model directories (the first is the baseline of the ratios)")
    off.add_argument("--batch-sizes", type=_ints, default=(1, 8), help="comma-separated (default 1,8)")
    off.add_argument("--input-lens", type=_ints, default=(128,), help="prompt tokens, comma-separated (default 128)")
    off.add_argument("--output-lens", type=_ints, default=(128,), help="generated tokens, comma-separated (default 128)")
    off.add_argument("--repeat", type=int, default=3, help="measured runs per point; the median is reported (default 3)")
    off.add_argument("--warmup", type=int, default=1, help="short unmeasured runs per point (default 1)")
    off.add_argument("--backend", default="auto", help="auto | kernel | onnxruntime | torch | trtllm | tp")
    off.add_argument("--tp", type=int, default=None,
                     help="tensor-parallel ranks for a TensorRT-LLM checkpoint exported with --tp N (one GPU each on cuda)")
    off.add_argument("--device", default="auto", help="auto (default: the GPU for model directories when one is visible), cpu, cuda[:N]")
    _kv_options(off)
    off.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: the runtime's choice)")
    off.add_argument(
        "--in-process", action="store_true", help="run every variant in this process (faster; peak memory then mixes variants)"
    )
    on = sub.add_parser(
        "online", help="a running server under Poisson, closed-loop or trace load: throughput and latency percentiles"
    )
    on.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000 (OpenAI-compatible /v1/completions)")
    on.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    on.add_argument("--rates", type=_rates, default=(), help="Poisson arrival rates in req/s, e.g. 1,2,4,inf")
    on.add_argument("--concurrency", type=_ints, default=(), help="closed-loop clients, e.g. 8 (a saturating load at batch 8)")
    on.add_argument("--trace", default=None, help="JSONL of {arrival_time, prompt, output_len} to replay")
    on.add_argument("--num-requests", type=int, default=64, help="requests per load point (default 64)")
    on.add_argument("--input-len", type=int, default=128, help="prompt tokens of synthetic requests (default 128)")
    on.add_argument("--output-len", type=int, default=128, help="tokens to generate per request (default 128)")
    on.add_argument("--tokenizer", default=None, help="tokenizer directory: send text prompts (default: token-id prompts)")
    on.add_argument("--corpus", default=None, help="text file the text prompts are cut from (default: sq-deploy's sources)")
    on.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at end-of-sequence (lengths then vary)")
    on.add_argument("--breakdown-factor", type=float, default=4.0, help="median TTFT growth that counts as breakdown (default 4)")
    ov = sub.add_parser("overhead", help="the same engine offline and behind sq-serve at one batch size, alternating rounds")
    ov.add_argument("engine_dirs", nargs="+", help="engine or model directories")
    ov.add_argument("--batch-size", type=int, default=8, help="offline batch size = concurrent served clients (default 8)")
    ov.add_argument("--input-len", type=int, default=128)
    ov.add_argument("--output-len", type=int, default=128)
    ov.add_argument("--rounds", type=int, default=5, help="alternating offline/served rounds; medians are compared (default 5)")
    ov.add_argument("--requests-per-round", type=int, default=16, help="served requests per round (default 16)")
    ov.add_argument("--backend", default="auto")
    ov.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks (TensorRT-LLM checkpoints), as for offline")
    ov.add_argument("--device", default="auto", help="auto (default: the GPU for model directories when one is visible), cpu, cuda[:N]")
    _kv_options(ov)
    ov.add_argument("--threads", type=int, default=None)
    for p in (off, on, ov):
        p.add_argument("--out", default=None, help="report directory (default: sq-bench-MODE-TIMESTAMP)")
        p.add_argument("--force", action="store_true", help="replace an existing --out")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def _header(title: str, argv: list[str] | None) -> str:
    from sqdeploy.runtime.bench.report import machine

    m = machine()
    cmd = "sq-bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    return (
        f"# {title}\n\n`{cmd}`\n\nmachine: {m['cpus']} CPUs ({m['processor']}), {m['platform']}, "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}" + (f", GPU {m['cuda']}" if m["cuda"] else "") + "\n"
    )


def _inputs(args) -> list:
    """Everything a benchmark reads from disk: its --out must not touch any of it."""
    return [*getattr(args, "engine_dirs", []), *(getattr(args, k, None) for k in ("tokenizer", "corpus", "trace"))]


def offline(args, argv) -> int:
    from sqdeploy.core.output import atomic_output_dir
    from sqdeploy.runtime.bench.offline import EngineSpec, OfflineGrid, run_offline
    from sqdeploy.runtime.bench.plots import offline_bars
    from sqdeploy.runtime.bench.report import machine, offline_table, write_report

    grid = OfflineGrid(args.batch_sizes, args.input_lens, args.output_lens, args.repeat, args.warmup, args.seed)
    specs = [
        EngineSpec(d, args.backend, args.device, args.threads, args.kv_cache_gib, args.gpu_memory_fraction, args.tp)
        for d in args.engine_dirs
    ]
    out = args.out or f"sq-bench-offline-{time.strftime('%Y%m%d-%H%M%S')}"
    with atomic_output_dir(out, args.force, _inputs(args)) as tmp:
        results = run_offline(specs, grid, isolate=not args.in_process, progress=not args.quiet)
        table = offline_table(results)
        plot = offline_bars(results, tmp / "offline.png")
        md = _header("sq-bench offline", argv) + "\n" + table
        write_report(tmp, "offline", {"machine": machine(), "grid": grid.__dict__, "variants": results}, md, [str(plot)])
    print(table)
    print(f"\nreport: {out}/report.md, {out}/report.json, {out}/offline.png")
    return 0


def online(args, argv) -> int:
    from sqdeploy.core.output import atomic_output_dir
    from sqdeploy.core.progress import Progress
    from sqdeploy.runtime.bench.online import (
        LoadPoint,
        RequestSpec,
        breakdown_rate,
        poisson_arrivals,
        read_trace,
        resolve_model,
        run_point,
        synthetic_prompts,
    )
    from sqdeploy.runtime.bench.plots import online_curves
    from sqdeploy.runtime.bench.report import machine, online_table, write_report

    if not (args.rates or args.concurrency or args.trace):
        raise SqDeployError("give at least one of --rates, --concurrency or --trace")
    url = args.url.rstrip("/")
    model = resolve_model(url, args.model)
    tokenizer = None
    if args.tokenizer:
        from sqdeploy.runtime.backends.base import load_tokenizer

        tokenizer = load_tokenizer(Path(args.tokenizer))
    corpus = Path(args.corpus).read_text() if args.corpus else None
    prompts = synthetic_prompts(args.num_requests, args.input_len, args.seed, tokenizer, corpus)
    plan: list[tuple[LoadPoint, list[RequestSpec]]] = []
    for c in args.concurrency:
        plan.append((LoadPoint("concurrency", c), [RequestSpec(p, args.output_len) for p in prompts]))
    for r in args.rates:
        arrivals = poisson_arrivals(len(prompts), r, args.seed)
        plan.append((LoadPoint("rate", r), [RequestSpec(p, args.output_len, t) for p, t in zip(prompts, arrivals)]))
    if args.trace:
        plan.append((LoadPoint("trace", 0), read_trace(args.trace)))
    out = args.out or f"sq-bench-online-{time.strftime('%Y%m%d-%H%M%S')}"
    with atomic_output_dir(out, args.force, _inputs(args)) as tmp:
        points = []
        with Progress(sum(len(s) for _, s in plan), "online benchmark", not args.quiet) as bar:
            for point, specs in plan:
                bar.update(point.label)
                points.append(asyncio.run(run_point(url, model, specs, point, not args.no_ignore_eos, bar.advance)))
        brk = breakdown_rate(points, args.breakdown_factor)
        table = online_table(points)
        plot = online_curves(points, tmp / "online.png", brk["rate"])
        note = f"latency breakdown: {brk['rate'] if brk['rate'] is not None else 'none'} ({brk['reason']})"
        md = _header(f"sq-bench online: {model} at {url}", argv) + "\n" + table + "\n\n" + note
        write_report(
            tmp, "online", {"machine": machine(), "url": url, "model": model, "points": points, "breakdown": brk}, md, [str(plot)]
        )
    print(table)
    print(f"\n{note}\nreport: {out}/report.md, {out}/report.json, {out}/online.png")
    failed = sum(p["failed"] for p in points)
    rejected = sum(p.get("rejected", 0) for p in points)
    if rejected:
        print(f"sq-bench: {rejected} request(s) rejected with HTTP 429 (the server's queue was full: the offered load "
              "exceeds its capacity)", file=sys.stderr)
    if failed:
        print(
            f"sq-bench: {failed} request(s) failed; first errors: {[e for p in points for e in p['first_errors']][:3]}",
            file=sys.stderr,
        )
    return 0


def overhead(args, argv) -> int:
    from sqdeploy.core.output import atomic_output_dir
    from sqdeploy.core.report import markdown_table
    from sqdeploy.runtime.bench.overhead import OverheadConfig, measure_overhead
    from sqdeploy.runtime.bench.plots import overhead_bars
    from sqdeploy.runtime.bench.report import machine, write_report

    cfg = OverheadConfig(
        args.batch_size, args.input_len, args.output_len, args.rounds, args.requests_per_round, args.threads, args.seed,
        args.device, args.kv_cache_gib, args.gpu_memory_fraction, args.tp,
    )
    out = args.out or f"sq-bench-overhead-{time.strftime('%Y%m%d-%H%M%S')}"
    with atomic_output_dir(out, args.force, _inputs(args)) as tmp:
        results = [measure_overhead(d, args.backend, cfg, not args.quiet) for d in args.engine_dirs]
        rows = [
            [
                Path(r["path"]).name,
                r["backend"],
                cfg.batch,
                f"{r['offline_median']:.1f}",
                f"{r['served_median']:.1f}",
                f"{100 * r['served_vs_offline']:.1f}%",
                " ".join(f"{x:.2f}" for x in r["per_round_ratio"]),
            ]
            for r in results
        ]
        table = markdown_table(
            ["engine", "backend", "batch", "offline tokens/s", "served tokens/s", "served / offline", "per-round ratios"], rows
        )
        plot = overhead_bars(results, tmp / "overhead.png")
        md = _header("sq-bench overhead: sq-serve vs offline at the same batch size", argv) + "\n" + table
        write_report(tmp, "overhead", {"machine": machine(), "results": results}, md, [str(plot)])
    print(table)
    print(f"\nreport: {out}/report.md, {out}/report.json, {out}/overhead.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"offline": offline, "online": online, "overhead": overhead}[args.mode](args, argv)


def entry() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
