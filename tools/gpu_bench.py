"""GPU benchmark of the real low-bit path: correctness first, then per-layer GEMMs, then a 7B-shaped model.

One invocation does everything and writes ``gpu-bench.json`` and ``gpu-bench.md``
under ``--out``::

    PYTHONPATH=. python tools/gpu_bench.py --out OUT --model .carry/tiny-code-llama

1. the card's ceilings, measured here: device-to-device copy bandwidth, FP16 matmul
   rate (cuBLAS), INT8 rate (the Triton INT8 GEMM and ``torch._int_mm``);
2. kernel self-checks against the exact PyTorch arithmetic (``sqdeploy.testing.kernel_selftest``);
3. the shared tiny Llama quantized here with the shipped recipes: kernel logits vs the
   fake-quant reference in float32, next to the float16 reference's own error, and
   greedy tokens from the CUDA-graph decoder;
4. per-layer GEMM time for Llama-2-7B and Code Llama-34B shapes at M = 1..2048:
   FP16 (cuBLAS), W8A8 (Triton INT8 + dequant epilogue; with and without the one-pass
   per-token quantization of its input), W4A16 (Triton INT4), and PyTorch's built-ins
   ``torch._int_mm`` and ``torch._weight_int4pack_mm``; each next to its roofline;
5. a 7B-shaped model with random weights per variant, all variants resident so that trials
   interleave: weight memory, prefill of 2048 tokens (eager and replayed from a CUDA graph),
   decode tokens/s at batch 1/8/32 (CUDA graphs), and a kernel-time profile.

Random weights are drawn in each format on the GPU; speed does not depend on values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=".carry/tiny-code-llama", help="the shared tiny Llama (real weights)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds; sections past it are skipped")
    ap.add_argument("--only", default=None, help="comma-separated section names")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (a smoke run)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU visible; this benchmark runs on a GPU machine", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401 - the kernels under test are Triton's
    except ImportError:
        print("gpu_bench: the triton package is missing: pip install -e .[gpu]", file=sys.stderr)
        return 2
    from gpu_bench_sections import SECTIONS, Bench  # needs triton: imported only on a GPU machine

    torch.backends.cuda.matmul.allow_tf32 = False
    bench = Bench(Path(args.out), args.model, time.time() + args.budget, args.quick)
    wanted = set(args.only.split(",")) if args.only else None
    for name, fn, seconds_needed in SECTIONS:
        if wanted and name not in wanted:
            continue
        if bench.remaining() < seconds_needed:
            bench.skip(name, f"skipped: {bench.remaining():.0f}s left of the budget, needs ~{seconds_needed}s")
            continue
        t0 = time.time()
        print(f"== {name}", flush=True)
        try:
            fn(bench)
            bench.done(name, time.time() - t0)
        except Exception:
            bench.fail(name, traceback.format_exc())
            print(traceback.format_exc(), flush=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        bench.save()
    bench.write_report()
    print(json.dumps(bench.summary(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
