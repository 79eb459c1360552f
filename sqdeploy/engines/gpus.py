"""GPU profiles: the facts about a target GPU that decide what can be built for it.

Memory sizes are what ``nvidia-smi`` reports as the card's total (MiB), because that
is what the CUDA allocator can reach; ``sm`` is the compute capability times ten,
because TensorRT and TensorRT-LLM engines are specific to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqdeploy.core.errors import SqDeployError

MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class GpuProfile:
    name: str
    description: str
    memory_bytes: int
    sm: int  # compute capability x 10 (80 = Ampere A100, 90 = Hopper)
    nvlink: bool = True

    @property
    def fp8(self) -> bool:
        """FP8 tensor cores exist from Ada (sm89) on; A100 has none."""
        return self.sm >= 89

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB


GPU_PROFILES: dict[str, GpuProfile] = {
    p.name: p
    for p in (
        GpuProfile("a100-40g", "NVIDIA A100 40 GB (SXM4/PCIe, sm80)", 40960 * MIB, 80),
        GpuProfile("a100-80g", "NVIDIA A100 80 GB (SXM4/PCIe, sm80)", 81920 * MIB, 80),
        GpuProfile("h100-80g", "NVIDIA H100 80 GB HBM3 (SXM5, sm90)", 81559 * MIB, 90),
        GpuProfile("h200", "NVIDIA H200 141 GB HBM3e (sm90)", 143771 * MIB, 90),
    )
}
DEFAULT_GPU = "a100-80g"


def get_gpu(name: str) -> GpuProfile:
    if name not in GPU_PROFILES:
        raise SqDeployError(f"unknown GPU profile '{name}'; known: {', '.join(GPU_PROFILES)}")
    return GPU_PROFILES[name]


def visible_gpus() -> list[tuple[str, int]]:
    """(name, sm) of every GPU this process can use; empty without CUDA."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        out.append((torch.cuda.get_device_name(i), major * 10 + minor))
    return out


def check_visible_gpus(needed: int, profile: GpuProfile, what: str) -> None:
    """Refuse before a long build: too few GPUs, or GPUs of another architecture."""
    gpus = visible_gpus()
    if len(gpus) < needed:
        raise SqDeployError(
            f"{what} needs {needed} GPU(s) (one per tensor-parallel rank) but {len(gpus)} are visible; "
            f"run it on a machine with {needed} GPUs (check CUDA_VISIBLE_DEVICES) or export with a smaller --tp"
        )
    other = sorted({(n, sm) for n, sm in gpus[:needed] if sm != profile.sm})
    if other:
        name, sm = other[0]
        raise SqDeployError(
            f"{what}: --gpu {profile.name} targets sm{profile.sm} but GPU '{name}' is sm{sm}; engines are specific to "
            f"the GPU architecture: build on the GPU you serve on, or pass the matching --gpu"
        )
