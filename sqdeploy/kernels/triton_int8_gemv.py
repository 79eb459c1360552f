"""INT8 x INT8 GEMV for one activation row (W8A8 decode at batch 1): four products per instruction.

At batch 1 a W8A8 decode step is a stream of INT8 weights with one multiply-add per byte.
The tensor-core GEMM serves one row by padding it to an MMA's 16 and tiles the weights for
a reuse one row does not have: on an H200 its 7B decode step read the weights at about 64%
of the copy bandwidth. Here both operands are K-contiguous (weights ``[N, K]``, the row
``[1, K]``), so one 32-bit word of each holds four neighbouring K values of one output
column, and ``dp4a`` multiplies the four byte pairs and adds them to an INT32 accumulator in
one instruction: a quarter of an instruction per weight byte, far below what the copy
bandwidth leaves room for, so the loop is a plain stream of wide, coalesced loads.

Integer sums are exact: before the float32 epilogue (``acc * s_x * s_w``, the GEMM's own
order) the result equals the GEMM's bit for bit; split over K, the float32 partials are
added in the fixed order of :func:`.triton_tiles._finish`, as the GEMM's are.

``MATH=1``: ``dp4a`` through inline PTX (GPU only). ``MATH=0``: the same products from
shifted bytes with Triton operations (any backend, Triton's CPU interpreter included).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sqdeploy.kernels.triton_tiles import _finish
from sqdeploy.kernels.tuning import INTERPRET

KIND = "gemv8"


@triton.jit
def _dp4a(w, x, acc, MATH: tl.constexpr):
    """``acc + sum_i byte_i(w) * byte_i(x)`` per element, bytes signed."""
    if MATH == 1:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [w, x, acc],
                                         dtype=tl.int32, is_pure=True, pack=1)
    for i in tl.static_range(4):
        acc += ((w << (24 - 8 * i)) >> 24) * ((x << (24 - 8 * i)) >> 24)  # arithmetic shifts: signed bytes
    return acc


@triton.jit
def _int8_gemv_kernel(x_ptr, w_ptr, as_ptr, bs_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                      N, KW, K_PER_W, SPLIT_K,
                      HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr, MATH: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    """``KW``: words per weight row (K / 4); each program covers ``BLOCK_N`` columns and ``K_PER_W`` words."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N  # columns past the end read real ones: in bounds, never stored
    offs_w = pid_k * K_PER_W + tl.arange(0, BLOCK_KW)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * KW + offs_w[None, :]
    x_ptrs = x_ptr + offs_w[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.int32)
    for _ in range(0, K_PER_W, BLOCK_KW):
        w = tl.load(w_ptrs, eviction_policy="evict_first")  # read once: keep the L2 for the activations
        x = tl.broadcast_to(tl.load(x_ptrs), (BLOCK_N, BLOCK_KW))
        acc = _dp4a(w, x, acc, MATH)
        w_ptrs += BLOCK_KW
        x_ptrs += BLOCK_KW
    y = tl.sum(acc, axis=1).to(tl.float32) * tl.load(as_ptr) * tl.load(bs_ptr + rn)
    _finish(y[None, :], out_ptr, bias_ptr, ws_ptr, cnt_ptr, pid_n, pid_k, tl.arange(0, 1), offs_n, 1, N, N, SPLIT_K,
            HAS_BIAS, IS_SPLIT, SPLIT_P2)


def gemv8_cfg(bn: int, bk: int, kper: int, warps: int, math: int = 1) -> dict:
    """``bk``/``kper``: K columns (bytes) per loop step / per program (0: all of K, no split)."""
    return dict(KIND=KIND, BLOCK_N=bn, BLOCK_K=bk, KPER=kper, MATH=math, num_warps=warps, num_stages=1)


# 16-64 columns x 512-1024 bytes of K per step (8-32 KiB of weights in flight per program); small
# outputs (4096 columns) split K so that every multiprocessor streams.
_CANDIDATES = [gemv8_cfg(32, 512, 0, 4), gemv8_cfg(16, 1024, 0, 4), gemv8_cfg(64, 512, 0, 8), gemv8_cfg(16, 512, 2048, 2),
               gemv8_cfg(32, 512, 2048, 4), gemv8_cfg(16, 1024, 2048, 4), gemv8_cfg(32, 1024, 4096, 8),
               gemv8_cfg(64, 256, 1024, 4)]


def aligned(qx: torch.Tensor, qw: torch.Tensor) -> bool:
    """Both operands readable as 32-bit words: K a multiple of 4, rows contiguous and 4-byte aligned."""
    k = qx.shape[1]
    return (k % 4 == 0 and qx.stride(1) == 1 and qx.stride(0) % 4 == 0 and qw.is_contiguous()
            and qx.data_ptr() % 4 == 0 and qw.data_ptr() % 4 == 0)


def candidates(k: int, max_split: int = 32) -> list[dict]:
    """The configurations for ``K`` (a multiple of each step; K split into equal programs only); the
    PTX form is GPU-only, so Triton's interpreter gets the plain one."""
    out = []
    for c in _CANDIDATES:
        for math in (0,) if INTERPRET else (c["MATH"],):
            bk = c["BLOCK_K"]
            while bk > 16 and k % bk:
                bk //= 2
            if k % bk:
                continue
            kper = k if not c["KPER"] or c["KPER"] >= k or k % c["KPER"] or c["KPER"] % bk else c["KPER"]
            r = dict(c, MATH=math, BLOCK_K=bk, K_PER=kper, SPLIT_K=k // kper)
            if r["SPLIT_K"] <= max_split and r not in out:
                out.append(r)
    return out


def launch(cfg: dict, qx, sx, qw, sw, bias, out, ws, cnt) -> None:
    """``ws``/``cnt``: the split-K workspace and tile counters (:func:`.triton_tiles._counters`)."""
    n, k = qw.shape
    split = cfg["SPLIT_K"]
    _int8_gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), split)](
        qx.view(torch.int32), qw.view(torch.int32), sx, sw, bias if bias is not None else sw, out, ws, cnt,
        N=n, KW=k // 4, K_PER_W=cfg["K_PER"] // 4, SPLIT_K=split, HAS_BIAS=bias is not None, IS_SPLIT=split > 1,
        SPLIT_P2=triton.next_power_of_2(split), MATH=cfg["MATH"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_KW=cfg["BLOCK_K"] // 4, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
