"""Generation runtime: the engine interface, its backends, continuous batching, the server and the benchmark."""

from __future__ import annotations

from pathlib import Path

from sqdeploy.core.errors import SqDeployError
from sqdeploy.runtime.batching import BatchConfig, BatchingEngine
from sqdeploy.runtime.engine import (
    Completion,
    Engine,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
    TokenEvent,
    generate,
    stream,
)

BACKENDS = ("auto", "onnxruntime", "torch", "trtllm")

__all__ = [
    "BACKENDS",
    "BatchConfig",
    "Completion",
    "Engine",
    "GenerationRequest",
    "InvalidRequestError",
    "SamplingParams",
    "TokenEvent",
    "generate",
    "open_engine",
    "resolve_backend",
    "stream",
]


def resolve_backend(path: str | Path, backend: str = "auto") -> str:
    """The backend for a directory: ONNX exports and ONNX Runtime engines -> onnxruntime, TensorRT-LLM engines ->
    trtllm, model directories (HF, quantized) -> torch."""
    from sqdeploy.formats.onnx.contract import is_onnx_dir
    from sqdeploy.runtime.backends.trtllm import is_trtllm_engine_dir

    if backend not in BACKENDS:
        raise SqDeployError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    p = Path(path)
    if not p.is_dir():
        raise SqDeployError(f"engine directory {p} does not exist")
    if is_onnx_dir(p):
        return "onnxruntime"
    if is_trtllm_engine_dir(p):
        return "trtllm"
    return "torch"


def open_engine(
    path: str | Path,
    backend: str = "auto",
    device: str = "cpu",
    threads: int | None = None,
    batch: BatchConfig = BatchConfig(),
    name: str | None = None,
    exact: bool = False,
) -> Engine:
    """A running engine over ``path`` (its worker thread started); ``shutdown()`` it when done.

    ``exact`` (onnxruntime) runs quantize/dequantize nodes as written, bit-faithful to the
    reference, instead of ONNX Runtime's faster fused integer kernels.
    """
    kind = resolve_backend(path, backend)
    if kind == "trtllm":
        from sqdeploy.runtime.backends.trtllm import TrtllmEngine

        return TrtllmEngine(path, name=name)
    if kind == "onnxruntime":
        from sqdeploy.runtime.backends.onnxruntime import OnnxRuntimeBackend

        step = OnnxRuntimeBackend(path, device, threads, exact)
    else:
        from sqdeploy.runtime.backends.torch import TorchBackend

        step = TorchBackend(path, device, threads)
    return BatchingEngine(step, batch, name)
