"""Compile the plane-wise INT4 GEMM's candidates for sm_90 on a machine without a GPU and report what
ptxas made of them: registers, spills (stack bytes), shared memory, the MMA instructions used, and the
SASS instruction mix of the main loop (the loop that branches back furthest).

Triton's wheel carries ptxas and cuobjdump, so this costs no GPU time::

    python tools/triton_sm90_report.py            # every candidate, one-group and multi-group tiles
    python tools/triton_sm90_report.py --sass     # plus the main loop's instruction mix
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sqdeploy.kernels import triton_int4_planes as tp  # noqa: E402

POINTERS = {"a_ptr": "*fp16", "b_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "bias_ptr": "*fp16",
            "out_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
ALIGNED_INTS = ("N", "K", "G", "K_PER", "stride_am", "stride_om")  # what a launch on 7B shapes specializes


def compile_sm90(kernel, consts: dict, warps: int, stages: int):
    names = kernel.arg_names
    sig = {n: "constexpr" if n in consts else POINTERS.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in list(POINTERS) + list(ALIGNED_INTS) if n in names}
    src = ASTSource(kernel, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resources(cubin: bytes) -> tuple[str, str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    return (f"{m.group(1)} regs, {m.group(2)} B stack" if m else res[:100]), sass


def loop_mix(sass: str) -> tuple[int, collections.Counter]:
    """Instruction count and opcode mix between the furthest backward branch and its target."""
    lines = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", sass)
    best = None
    for addr, _, op, rest in lines:
        t = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if t and int(t.group(1), 16) < int(addr, 16):
            span = (int(t.group(1), 16), int(addr, 16))
            best = span if best is None or span[1] - span[0] > best[1] - best[0] else best
    if best is None:
        return 0, collections.Counter()
    body = [op.split(".")[0] for addr, _, op, _ in lines if best[0] <= int(addr, 16) <= best[1]]
    return len(body), collections.Counter(body)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sass", action="store_true", help="also print the main loop's instruction mix")
    args = ap.parse_args(argv)
    seen = set()
    for bucket, m in ((16, 8), (32, 32), (64, 64)):
        for c in tp.candidates(bucket, m):
            for one_group in (True, False):
                key = (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["num_stages"], c["MATH"], one_group)
                if key in seen:
                    continue
                seen.add(key)
                consts = dict(HAS_ZERO=True, HAS_BIAS=False, IS_SPLIT=bool(c["KPER"]), SPLIT_P2=8, ONE_GROUP=one_group,
                              MATH=c["MATH"], BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], GROUP_M=8)
                k = compile_sm90(tp._int4_planes_kernel, consts, c["num_warps"], c["num_stages"])
                res, sass = resources(k.asm["cubin"])
                mma = collections.Counter(re.findall(r"(wgmma\.mma_async|mma\.sync)", k.asm["ptx"]))
                tile = "x".join(map(str, key[:3]))
                print(f"{tile} w{key[3]}s{key[4]} MATH={key[5]} one_group={one_group}: {res}, "
                      f"{k.metadata.shared} B shared, {dict(mma)}")
                if args.sass:
                    n, mix = loop_mix(sass)
                    print(f"   loop: {n} instructions; " + ", ".join(f"{op} {cnt}" for op, cnt in mix.most_common(10)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
