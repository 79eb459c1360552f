"""Which device the kernel model runs on, refused with the remedy when it cannot run there."""

from __future__ import annotations

import torch

from sqdeploy.core.errors import MissingDependencyError, SqDeployError

MIN_CAPABILITY = (8, 0)  # Triton's INT8/FP16 tensor-core paths used here (Ampere and newer)


def resolve_device(device: str | torch.device, dtype: torch.dtype | None, source=None) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device)
    if dev.type == "cpu":
        return dev, dtype or torch.float32
    if dev.type != "cuda":
        raise SqDeployError(f"device {dev} is not supported by the kernel engine; use 'cuda' or 'cpu'")
    check_cuda(dev, needs_int8=_needs_int8(source))
    if dtype not in (None, torch.float16, torch.bfloat16):
        raise SqDeployError(f"GPU kernels run float16 or bfloat16 activations, not {dtype}")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev, dtype or torch.float16


def _needs_int8(source) -> bool:
    scheme = getattr(source, "scheme", None)
    return scheme is not None and not scheme.is_float and scheme.act.quantized


def check_cuda(dev: torch.device, needs_int8: bool = False) -> None:
    if not torch.cuda.is_available():
        raise SqDeployError(
            "device 'cuda' was asked for but PyTorch sees no CUDA GPU; run on a GPU machine or use device 'cpu' "
            "(exact integer arithmetic in PyTorch, slow)"
        )
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise SqDeployError(f"{dev} does not exist: {n} CUDA GPU(s) visible")
    try:
        import triton  # noqa: F401 - the kernels are Triton's
    except ImportError as e:
        raise MissingDependencyError("triton", "the GPU kernels (INT8/INT4 GEMMs, fused norms)") from e
    cap = torch.cuda.get_device_capability(dev)
    if cap < MIN_CAPABILITY:
        what = "INT8 tensor-core GEMMs (W8A8)" if needs_int8 else "the Triton kernels"
        raise SqDeployError(
            f"{torch.cuda.get_device_name(dev)} (compute capability {cap[0]}.{cap[1]}) cannot run {what}: "
            f"compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer is needed; "
            "use device 'cpu' or a newer GPU"
        )


def check_gpus_for_tp(tp: int) -> None:
    """Tensor parallelism over NCCL: one GPU per rank."""
    if not torch.cuda.is_available():
        raise SqDeployError(f"tp {tp} on CUDA needs {tp} GPUs but none is visible; use device 'cpu' (gloo) or a GPU machine")
    n = torch.cuda.device_count()
    if n < tp:
        raise SqDeployError(f"tp {tp} needs {tp} GPUs, {n} visible; lower --tp or run on a machine with {tp} GPUs")
