"""Generation runtime: the engine interface, its backends, continuous batching, the server and the benchmark."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class KernelOptions:
    """The kernel backend's KV cache budget (``kv_cache_gib``, or a ``gpu_memory_fraction`` of the device,
    default 0.9), positions per sequence (``max_model_len``, default the model's context), CUDA-graph
    decode steps (captured for every batch-size bucket at start), activation dtype (float16 by default
    on a GPU) and the seed of unseeded sampling."""

    kv_cache_gib: float | None = None
    gpu_memory_fraction: float | None = None
    max_model_len: int | None = None
    cuda_graphs: bool = True
    dtype: str | None = None
    seed: int | None = None
    capture_at_start: bool = True


BACKENDS = ("auto", "kernel", "onnxruntime", "torch", "trtllm", "tp")

__all__ = [
    "BACKENDS",
    "BatchConfig",
    "Completion",
    "Engine",
    "GenerationRequest",
    "InvalidRequestError",
    "KernelOptions",
    "SamplingParams",
    "TokenEvent",
    "generate",
    "open_engine",
    "resolve_backend",
    "stream",
]


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_backend(path: str | Path, backend: str = "auto", device: str = "cpu", tp: int | None = None) -> str:
    """The backend for a directory: ONNX exports and ONNX Runtime engines -> onnxruntime, TensorRT-LLM engines ->
    trtllm, TensorRT-LLM checkpoints written for tp > 1 (or any, with ``tp`` given) -> tp, model directories
    (HF, quantized) -> kernel on a GPU (``device`` cuda, or ``auto`` with a GPU visible), torch (the float32
    reference) on the CPU."""
    from sqdeploy.formats.onnx.contract import is_onnx_dir
    from sqdeploy.runtime.backends.tp import check_tp_request, checkpoint_tp
    from sqdeploy.runtime.backends.trtllm import is_trtllm_engine_dir

    if backend not in BACKENDS:
        raise SqDeployError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if tp is not None:
        if tp < 1:
            raise SqDeployError(f"--tp must be >= 1 (got {tp})")
        if backend not in ("auto", "tp"):
            raise SqDeployError(f"--tp runs the tensor-parallel backend, not --backend {backend}; drop one of them")
        check_tp_request(path, tp)
        return "tp"
    if backend != "auto":
        return backend
    p = Path(path)
    if not p.is_dir():
        raise SqDeployError(f"engine directory {p} does not exist")
    if is_onnx_dir(p):
        return "onnxruntime"
    if is_trtllm_engine_dir(p):
        return "trtllm"
    if (checkpoint_tp(p) or 1) > 1:
        return "tp"
    on_gpu = str(device).startswith("cuda") or (device == "auto" and _cuda_visible())
    return "kernel" if on_gpu else "torch"


def resolve_device(device: str, kind: str) -> str:
    """``auto``: the GPU for the kernel backend, the CPU for the others; anything else as given."""
    if device != "auto":
        return device
    return "cuda" if kind == "kernel" else "cpu"


def open_engine(
    path: str | Path,
    backend: str = "auto",
    device: str = "cpu",
    threads: int | None = None,
    batch: BatchConfig = BatchConfig(),
    name: str | None = None,
    exact: bool = False,
    kernel: KernelOptions | None = None,
    tp: int | None = None,
) -> Engine:
    """A running engine over ``path`` (its worker thread started); ``shutdown()`` it when done.

    ``exact`` (onnxruntime) runs quantize/dequantize nodes as written, bit-faithful to the
    reference, instead of ONNX Runtime's faster fused integer kernels. ``device`` ``cuda[:N]``
    (or ``auto`` with a GPU visible) serves HF and quantized directories with the kernel
    backend; ``kernel`` sizes its KV cache (see :class:`KernelOptions`).

    ``tp`` N (or ``backend`` ``tp``, or ``auto`` on a checkpoint written for tp > 1) serves a TensorRT-LLM
    checkpoint exported with ``--tp N`` on N rank processes: NCCL with one GPU each on ``cuda``, gloo on
    ``cpu``; ``auto`` is the GPUs when one is visible. ``shutdown()`` stops the ranks.
    """
    kind = resolve_backend(path, backend, device, tp)
    if kind == "tp":
        from sqdeploy.runtime.backends.tp import TPBackend

        return BatchingEngine(TPBackend(path, device, _kernel_config(batch, kernel), tp), batch, name)
    device = resolve_device(device, kind)
    if kind == "trtllm":
        from sqdeploy.runtime.backends.trtllm import TrtllmEngine

        return TrtllmEngine(path, name=name)
    if kind == "onnxruntime":
        from sqdeploy.runtime.backends.onnxruntime import OnnxRuntimeBackend

        step = OnnxRuntimeBackend(path, device, threads, exact)
    elif kind == "kernel":
        from sqdeploy.runtime.backends.kernel import KernelBackend

        step = KernelBackend(path, device, _kernel_config(batch, kernel), threads)
    else:
        from sqdeploy.runtime.backends.torch import TorchBackend

        step = TorchBackend(path, device, threads)
    return BatchingEngine(step, batch, name)


def _kernel_config(batch: BatchConfig, kernel: KernelOptions | None):
    from sqdeploy.runtime.backends.kernel import KernelConfig

    k = kernel or KernelOptions()
    return KernelConfig(batch.max_batch_size, batch.max_prefill_tokens, k.kv_cache_gib, k.gpu_memory_fraction,
                        k.max_model_len, k.cuda_graphs, k.dtype, k.seed, k.capture_at_start)
