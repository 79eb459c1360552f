"""INT4-weight GEMV for one activation row (decode at batch 1).

At batch 1 a 7B decode step reads 3.4 GB of packed weights and does almost no arithmetic
per byte, yet a plain GEMV issues about 40 instructions per packed word (unpack, convert,
subtract the zero point, multiply-add, and the activation loads that feed them), which on
an H100 costs about as much time as streaming the word. So the kernel keeps tiles small
(``[BLOCK_K/8, BLOCK_N]`` words, many programs in flight, K split over programs with the
deterministic last-arriving-program reduction of :mod:`.triton_gemm`) and offers the tuner
cheaper inner loops:

* ``MATH=1``: nibble ``q`` is shifted into the top mantissa bits of ``1.0`` (one shift and one
  masked OR give the float ``1 + q/16`` exactly, no int-to-float conversion) and multiplied
  into the sum as is; the ``1`` and the zero point come out once per packed row through
  ``sum(x)``: ``sum((q - z) x) = 16 sum((1 + q/16) x) - (16 + z) sum(x)``. ``MATH=0`` forms
  ``q`` as ``2^23 + q`` and subtracts ``2^23 + z`` per nibble.
* ``STAGES > 1``: Triton's own software pipelining of the K loop (``tl.range(num_stages=)``).

Measured on an H100 and dropped: wider tiles (several quantization groups per load, 16-32 KiB:
1.5-2x slower, their per-thread state spills and fewer programs fit a multiprocessor) and
register prefetch of the next tile (no gain).

``X_GATED``: the input row is ``act(gate) * up`` of the fused gate|up output, computed here
(decode's act*mul fused into the down projection).
"""

from __future__ import annotations

import triton
import triton.language as tl

from sqdeploy.kernels.triton_fused import _act
from sqdeploy.kernels.triton_tiles import _finish


@triton.jit
def _gemv_x(x_ptrs, i, X_GATED: tl.constexpr, ACT: tl.constexpr, GATE_OFF):
    """Input column ``i`` of each packed row as float32; X_GATED: the reference's float16 ``act(g) * u``."""
    if X_GATED:
        g = tl.load(x_ptrs + i)
        u = tl.load(x_ptrs + GATE_OFF + i)
        a = _act(g.to(tl.float32), ACT).to(g.dtype)
        return (a.to(tl.float32) * u.to(tl.float32)).to(g.dtype).to(tl.float32)
    return tl.load(x_ptrs + i).to(tl.float32)


@triton.jit
def _tile_dot(p, x_ptrs, z, X_GATED: tl.constexpr, ACT: tl.constexpr, GATE_OFF, MATH: tl.constexpr):
    """``sum_i (q_i - z) x_i`` for every packed word of the tile ``p`` ([R, BN]); ``x_ptrs`` [R, 1], ``z`` [1, BN]."""
    part = tl.zeros(p.shape, dtype=tl.float32)
    if MATH == 1:
        xs = tl.zeros(x_ptrs.shape, dtype=tl.float32)
        for i in tl.static_range(8):
            xi = _gemv_x(x_ptrs, i, X_GATED, ACT, GATE_OFF)
            if 4 * i <= 19:
                t = p << (19 - 4 * i)
            else:
                t = p >> (4 * i - 19)
            part += ((t & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True) * xi  # (1 + q/16) x
            xs += xi
        return 16.0 * part - (16.0 + z) * xs
    zm = z + 8388608.0
    for i in tl.static_range(8):
        xi = _gemv_x(x_ptrs, i, X_GATED, ACT, GATE_OFF)
        qi = (((p >> (4 * i)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + q
        part += (qi - zm) * xi
    return part


@triton.jit
def _scale_zero(s_ptr, z_ptr, g, N, rn, HAS_ZERO: tl.constexpr):
    s = tl.load(s_ptr + g * N + rn).to(tl.float32)[None, :]
    if HAS_ZERO:
        z = tl.load(z_ptr + g * N + rn).to(tl.float32)[None, :]
    else:
        z = tl.full((1, rn.shape[0]), 8.0, tl.float32)
    return s, z


@triton.jit
def _int4_gemv_kernel(x_ptr, b_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                      N, K, G, K_PER, SPLIT_K, GATE_OFF,
                      HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr,
                      X_GATED: tl.constexpr, ACT: tl.constexpr, MATH: tl.constexpr, STAGES: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One tile of ``BLOCK_K/8`` packed rows per step (BLOCK_K divides the group: one scale row per tile)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    rows = tl.arange(0, BLOCK_K // 8)
    k0 = pid_k * K_PER
    b_ptrs = b_ptr + (k0 // 8 + rows)[:, None].to(tl.int64) * N + rn[None, :]
    x_ptrs = x_ptr + k0 + rows[:, None] * 8
    acc = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
    for k in tl.range(k0, k0 + K_PER, BLOCK_K, num_stages=STAGES):
        p = tl.load(b_ptrs, eviction_policy="evict_first")
        s, z = _scale_zero(s_ptr, z_ptr, k // G, N, rn, HAS_ZERO)
        acc += _tile_dot(p, x_ptrs, z, X_GATED, ACT, GATE_OFF, MATH) * s
        b_ptrs += (BLOCK_K // 8) * N
        x_ptrs += BLOCK_K
    y = tl.sum(acc, axis=0)
    _finish(y[None, :], out_ptr, bias_ptr, ws_ptr, cnt_ptr, pid_n, pid_k, tl.arange(0, 1), offs_n, 1, N, N, SPLIT_K,
            HAS_BIAS, IS_SPLIT, SPLIT_P2)


# ------------------------------------------------------------------ candidates and launch

def gemv_cfg(bn: int, bk: int, kper: int, warps: int, math: int = 1, stages: int = 1) -> dict:
    """``KPER``: K columns per program (K is split over ``K / KPER`` programs per column block)."""
    return dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, KPER=kper, MATH=math, STAGES=stages, UNPACK=0, GROUP_M=8,
                num_warps=warps, num_stages=1)


# The fastest per 7B/34B shape in a sweep of ~30 on an H100 (tools/gpu_tune.py); 128-row tiles, 256-512
# columns of K per program, 1-4 warps. Software pipelining and register prefetch did not pay.
CANDIDATES = [
    gemv_cfg(64, 128, 512, 4), gemv_cfg(128, 128, 512, 2), gemv_cfg(32, 128, 256, 2), gemv_cfg(64, 128, 256, 4),
    gemv_cfg(32, 128, 512, 1), gemv_cfg(64, 128, 512, 4, 0), gemv_cfg(64, 128, 256, 4, 0), gemv_cfg(64, 128, 1024, 4, 1, 2),
]


def launch(cfg: dict, x, packed, scales, zeros, bias, out, group: int, act_code: int, gated: bool, split_args: dict):
    n = packed.shape[1]
    k = packed.shape[0] * 8
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    _int4_gemv_kernel[grid](
        x, packed, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out,
        N=n, K=k, G=group, GATE_OFF=k, HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None, X_GATED=gated,
        ACT=act_code, MATH=cfg.get("MATH", 0), STAGES=cfg.get("STAGES", 1),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **split_args,
    )
