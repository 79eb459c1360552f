"""Hardware-counter profile of the W4A16 kernels the tuner chose, one launch each, for Nsight Compute.

Timing under the profiler is meaningless (every launch is serialized and instrumented), so the
choices come from a GPU benchmark's JSON (``tuning``), made without the profiler; then each chosen
kernel runs once between ``cudaProfilerStart``/``Stop``, so that ``ncu --profile-from-start off``
sees only those::

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats --section SchedulerStats python3 tools/gpu_int4_profile.py OUT/gpu-bench.json
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sqdeploy.kernels import triton_gemm  # noqa: E402
from sqdeploy.testing.random_weights import VARIANTS, random_linear  # noqa: E402

SHAPES = {"qkv": (12288, 4096), "down": (4096, 11008)}


def _load_choices(path: str) -> None:
    tuning = json.loads(Path(path).read_text()).get("tuning", {})
    for name, tuner in (("int4_gemm", triton_gemm._INT4), ("int4_gemv", triton_gemm._INT4_GEMV)):
        for key, cfg in tuning.get(name, {}).items():
            tuner.best[ast.literal_eval(key)] = cfg


def main(argv: list[str]) -> int:
    if argv:
        _load_choices(argv[0])
    cases = []
    for name, (n, k) in SHAPES.items():
        mod = random_linear(n, k, VARIANTS["w4a16"], "cuda", seed=0)
        for m in (1, 16, 32, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            mod(x)  # compiles (and tunes what the JSON did not choose)
            cases.append((name, m, mod, x, triton_gemm.int4_choice(m, n, k, mod.group_size)))
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for _, _, mod, x, _ in cases:
        mod(x)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    for name, m, _, _, choice in cases:
        print(f"profiled {name} M={m}: {choice}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
