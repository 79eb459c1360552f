"""sq-serve: serve an engine over HTTP (OpenAI completions and KServe v2 / Triton), with Prometheus metrics."""

from __future__ import annotations

import argparse
import sys

from .common import run_cli


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1-65535 (0 would bind a random port nobody is told about)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


def build_parser() -> argparse.ArgumentParser:
    from ..runtime import BACKENDS

    ap = argparse.ArgumentParser(
        prog="sq-serve",
        description="Serve a model directory with continuous batching: OpenAI-compatible /v1/completions and /v1/models, "
        "KServe v2 / Triton /v2/... (infer, generate, generate_stream), Prometheus /metrics. SIGTERM drains "
        "requests in flight, then exits.",
    )
    ap.add_argument(
        "engine_dir",
        help="ONNX export or ONNX Runtime engine (onnxruntime), TensorRT-LLM engine (trtllm), "
        "or an HF / quantized model directory (torch)",
    )
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=port_number, default=8000, help="port (default 8000)")
    ap.add_argument("--backend", default="auto", choices=BACKENDS, help="default: chosen from the directory's kind")
    ap.add_argument("--model-name", default=None, help="name clients use (default: the directory's name)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (onnxruntime needs onnxruntime-gpu for cuda)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: the runtime's own choice)")
    g = ap.add_argument_group("limits")
    g.add_argument(
        "--max-concurrent-requests",
        "--max-batch-size",
        dest="max_concurrent",
        type=int,
        default=8,
        help="sequences generated together, the batch size (default 8)",
    )
    g.add_argument(
        "--max-queue", type=int, default=64, help="sequences that may wait for a slot; beyond that HTTP 429 (default 64)"
    )
    g.add_argument("--max-prompt-tokens", type=int, default=2048, help="longest prompt accepted (default 2048)")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="largest max_tokens accepted (default 1024)")
    g.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds before a request is cancelled with 504 (default 600)"
    )
    g.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="largest request body; beyond that HTTP 413 (default 1 MiB)"
    )
    g.add_argument("--max-prefill-tokens", type=int, default=4096, help="padded prompt tokens per prefill step (default 4096)")
    g.add_argument("--drain-timeout", type=float, default=60.0, help="seconds SIGTERM waits for requests in flight (default 60)")
    ap.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return ap


def main(argv: list[str] | None = None) -> int:
    from ..runtime import BatchConfig, open_engine
    from ..runtime.server.limits import ServeLimits
    from ..runtime.server.run import serve

    args = build_parser().parse_args(argv)
    limits = ServeLimits(
        args.max_prompt_tokens,
        args.max_new_tokens,
        args.max_concurrent,
        args.max_queue,
        args.request_timeout,
        args.max_body_bytes,
    )
    engine = open_engine(
        args.engine_dir,
        args.backend,
        args.device,
        args.threads,
        BatchConfig(args.max_concurrent, args.max_prefill_tokens),
        args.model_name,
    )
    print(
        f"sq-serve: {engine.info.name} ({engine.info.description}) on http://{args.host}:{args.port} "
        f"[batch {args.max_concurrent}, queue {args.max_queue}]",
        file=sys.stderr,
        flush=True,
    )
    serve(engine, args.host, args.port, limits, args.drain_timeout, args.log_level)
    return 0


def entry() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
