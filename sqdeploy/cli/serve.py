"""sq-serve: serve an engine over HTTP (OpenAI completions and chat, KServe v2 / Triton), with Prometheus metrics."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sqdeploy.cli.common import add_kernel_options, kernel_options, run_cli
from sqdeploy.core.errors import SqDeployError


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
    from sqdeploy.runtime import BACKENDS

    ap = argparse.ArgumentParser(
        prog="sq-serve",
        description="Serve a model directory with continuous batching: OpenAI-compatible /v1/completions, "
        "/v1/chat/completions and /v1/models, "
        "KServe v2 / Triton /v2/... (infer, generate, generate_stream), Prometheus /metrics. SIGTERM drains "
        "requests in flight, then exits.",
    )
    ap.add_argument(
        "engine_dir",
        help="ONNX export or ONNX Runtime engine (onnxruntime), TensorRT-LLM engine (trtllm), "
        "TensorRT-LLM checkpoint (tp), or an HF / quantized model directory (kernel on a GPU, torch on the CPU)",
    )
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=port_number, default=8000, help="port (default 8000)")
    ap.add_argument("--backend", default="auto", choices=BACKENDS, help="default: chosen from the directory's kind")
    ap.add_argument(
        "--tp",
        type=int,
        default=None,
        metavar="N",
        help="tensor parallelism: serve a TensorRT-LLM checkpoint exported with sq-export --target trtllm --tp N on N "
        "rank processes (one GPU each over NCCL with --device cuda, gloo with --device cpu); a checkpoint written "
        "for tp > 1 is served this way by default",
    )
    ap.add_argument("--model-name", default=None, help="name clients use (default: the directory's name)")
    ap.add_argument(
        "--device",
        default="auto",
        help="auto (default: the GPU for HF / quantized directories when one is visible, else the CPU), cpu, cuda, "
        "cuda:1 (onnxruntime needs onnxruntime-gpu for cuda)",
    )
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
    g.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=4096,
        help="prompt tokens per prefill step (default 4096); the kernel backend feeds longer prompts in chunks of this size",
    )
    g.add_argument("--drain-timeout", type=float, default=60.0, help="seconds SIGTERM waits for requests in flight (default 60)")
    g.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="open connections; beyond that the longest-idle one without a request is closed (default 512)",
    )
    g.add_argument(
        "--header-timeout", type=float, default=10.0, help="seconds a client has to send its request headers (default 10)"
    )
    g.add_argument(
        "--body-timeout", type=float, default=30.0, help="seconds a client has to send its request body; then 408 (default 30)"
    )
    ap.add_argument(
        "--api-key",
        default=os.environ.get("SQDEPLOY_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' on every route but /health and /v2/health/* "
        "(default: $SQDEPLOY_API_KEY; none: no authentication)",
    )
    ap.add_argument(
        "--chat-template",
        type=Path,
        default=None,
        metavar="FILE",
        help="Jinja chat template for /v1/chat/completions (default: the tokenizer's own)",
    )
    add_kernel_options(ap)
    ap.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return ap


def main(argv: list[str] | None = None) -> int:
    from sqdeploy.runtime import BatchConfig, open_engine
    from sqdeploy.runtime.server.limits import ServeLimits, ServeOptions
    from sqdeploy.runtime.server.run import serve

    args = build_parser().parse_args(argv)
    limits = ServeLimits(
        args.max_prompt_tokens,
        args.max_new_tokens,
        args.max_concurrent,
        args.max_queue,
        args.request_timeout,
        args.max_body_bytes,
        max_connections=args.max_connections,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
    )
    options = ServeOptions(api_key=args.api_key, chat_template=read_template(args.chat_template))
    engine = open_engine(
        args.engine_dir,
        args.backend,
        args.device,
        args.threads,
        BatchConfig(args.max_concurrent, args.max_prefill_tokens),
        args.model_name,
        kernel=kernel_options(args),
        tp=args.tp,
    )
    if options.chat_template is not None:
        check_template(engine, options.chat_template, args.chat_template)
    print(
        f"sq-serve: {engine.info.name} ({engine.info.description}) on http://{args.host}:{args.port} "
        f"[batch {args.max_concurrent}, queue {args.max_queue}, "
        f"{'API key required' if options.api_key else 'no API key'}]",
        file=sys.stderr,
        flush=True,
    )
    cut = serve(engine, args.host, args.port, limits, args.drain_timeout, args.log_level, options)
    if cut:
        print(
            f"sq-serve: the {args.drain_timeout:g} s drain timeout expired with {cut} sequences in flight; "
            "they were answered with HTTP 503",
            file=sys.stderr,
        )
        return 1
    return 0


def read_template(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SqDeployError(f"--chat-template {path}: cannot read it ({exc})") from None


def check_template(engine, template: str, path: Path) -> None:
    """Render a one-message conversation, so a broken template fails at start, not on the first request."""
    try:
        engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": "hello"}], chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except Exception as exc:  # noqa: BLE001 - jinja syntax and runtime errors alike
        engine.shutdown(drain=False)
        raise SqDeployError(f"--chat-template {path} is not a usable chat template: {exc}") from None


def entry() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry()
