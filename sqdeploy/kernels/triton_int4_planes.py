"""Tensor-core INT4 x FP16 GEMM for a few rows (2-256), on the packed weights as they are.

The plain INT4 GEMM (:mod:`.triton_gemm`) unpacks a ``[BK/8, BN]`` tile of words into a
``[BK, BN]`` tile whose row ``8j + i`` is nibble ``i`` of word row ``j``. That reshape puts
neighbouring K values in different words, so Triton cannot dequantize in the layout the
tensor cores read: every K step writes the dequantized tile to shared memory and reads it
back as an MMA operand, and at small M that round trip, not the weight stream, sets the
time (0.5-0.6x FP16 at M = 16-64 on an H200).

This kernel reads the same words as eight *planes*: plane ``i`` is nibble ``i`` of every
word of the tile, a ``[BK/8, BN]`` tile that holds K columns ``k0 + 8j + i``. Each plane
is multiplied by the matching strided slice of the activations (``x[:, k0 + i :: 8]``, picked out
of one contiguous activation tile with register-only splits),
``acc += dot(x_i, dequant(plane_i))``, eight small dots per tile. Dequantizing a plane is
an element-wise function of the loaded words (shift, mask, the FP16 ``1024 + q`` bit
trick, subtract the zero point, multiply by the scale), so the compiler can load the words
straight into the MMA operand layout (the software pipeline stages them in shared memory
with asynchronous copies) and dequantize in registers: the Marlin recipe, without
reshuffling the weights offline. Sum order differs from the reference's only in how the
float32 accumulator adds up K, the same freedom every GEMM takes.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sqdeploy.kernels.triton_tiles import _finish, _tile_ids
from sqdeploy.kernels.tuning import INTERPRET

KIND = "planes"


@triton.jit
def _dequant(qf, zf, s, dtype: tl.constexpr):
    """``(q - z) * s`` from the FP16 ``1024 + q`` and ``1024 + z`` (exact), rounded as the reference rounds."""
    return ((qf - zf).to(s.dtype) * s).to(dtype)


@triton.jit
def _plane(p, i: tl.constexpr, zf, s, dtype: tl.constexpr):
    """Dequantized plane ``i`` of the words ``p``, unpacked by Triton operations."""
    q = ((p >> (4 * i)) & 0xF) | 0x6400
    return _dequant(q.to(tl.int16).to(tl.float16, bitcast=True), zf, s, dtype)


# Two words of one output column and neighbouring K rows (the pair an MMA operand register holds) ->
# eight registers, plane i's two nibbles as the FP16 pair (1024 + q_row, 1024 + q_row+1): two byte
# permutes, then one shift and one and-or (lop3) per plane: 16 integer operations per 16 nibbles (on sm_90
# the loop's integer operations per thread and 128x64 tile drop from 181 to 99: tools/triton_sm90_report.py).
def _pair_asm() -> str:
    lines = ["{", ".reg .b32 lo, hi, t;", "prmt.b32 lo, $8, $9, 0x5410;", "prmt.b32 hi, $8, $9, 0x7632;"]
    for half, src in enumerate(("lo", "hi")):  # lo: planes 0-3 of both words, hi: planes 4-7
        for j in range(4):
            if j:
                lines.append(f"shr.b32 t, {src}, {4 * j};")
            lines.append(f"lop3.b32 ${4 * half + j}, {'t' if j else src}, 0x000f000f, 0x64006400, 0xea;")  # (a & b) | c
    return "\n".join(lines + ["}"])


_PAIR_ASM = tl.constexpr(_pair_asm())


@triton.jit
def _planes_asm(p):
    """All eight planes of ``p`` as FP16 ``1024 + q`` (PTX; GPU only)."""
    return tl.inline_asm_elementwise(_PAIR_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [p], dtype=(tl.float16,) * 8,
                                     is_pure=True, pack=2)


@triton.jit
def _int4_planes_kernel(a_ptr, b_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                        M, N, K, G, K_PER, SPLIT_K, stride_am, stride_om,
                        HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr,
                        SPLIT_P2: tl.constexpr, ONE_GROUP: tl.constexpr, MATH: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """``ONE_GROUP``: the group size is a multiple of BLOCK_K (one scale row per tile); otherwise
    every word row of the tile fetches its own group's scale (BLOCK_K spans several groups)."""
    KW: tl.constexpr = BLOCK_K // 8
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _tile_ids(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M  # rows past the end read real rows: in bounds, never stored
    rn = offs_n % N
    rows = tl.arange(0, KW)
    k0 = pid_k * K_PER
    b_ptrs = b_ptr + (k0 // 8 + rows)[:, None].to(tl.int64) * N + rn[None, :]
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + (k0 + tl.arange(0, BLOCK_K))[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # even planes
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # odd planes: two independent MMA chains
    for k in range(k0, tl.minimum(k0 + K_PER, K), BLOCK_K):  # the last K slice may be shorter
        p = tl.load(b_ptrs)
        xt = tl.load(a_ptrs)
        # one contiguous activation tile; plane i's columns k0 + 8j + i are picked out of each thread's neighbours
        x_e, x_o = tl.split(tl.reshape(xt, (BLOCK_M, KW, 2, 2, 2)))  # i even / odd
        x_e0, x_e1 = tl.split(x_e)  # i in {0, 4} / {2, 6}
        x_o0, x_o1 = tl.split(x_o)  # i in {1, 5} / {3, 7}
        x0, x4 = tl.split(x_e0)
        x2, x6 = tl.split(x_e1)
        x1, x5 = tl.split(x_o0)
        x3, x7 = tl.split(x_o1)
        dt = x0.dtype
        if ONE_GROUP:
            g_off = (k // G) * N + rn[None, :]
        else:
            g_off = ((k + rows * 8) // G)[:, None] * N + rn[None, :]
        s = tl.load(s_ptr + g_off)
        if HAS_ZERO:
            zf = tl.load(z_ptr + g_off).to(tl.float16) + 1024.0
        else:
            zf = tl.full((1, BLOCK_N), 1032.0, tl.float16)
        if MATH == 2:  # the planes unpacked by PTX, then the reference's (q - z) * s in FP16
            q0, q1, q2, q3, q4, q5, q6, q7 = _planes_asm(p)
            acc = tl.dot(x0, _dequant(q0, zf, s, dt), acc)
            acc1 = tl.dot(x1, _dequant(q1, zf, s, dt), acc1)
            acc = tl.dot(x2, _dequant(q2, zf, s, dt), acc)
            acc1 = tl.dot(x3, _dequant(q3, zf, s, dt), acc1)
            acc = tl.dot(x4, _dequant(q4, zf, s, dt), acc)
            acc1 = tl.dot(x5, _dequant(q5, zf, s, dt), acc1)
            acc = tl.dot(x6, _dequant(q6, zf, s, dt), acc)
            acc1 = tl.dot(x7, _dequant(q7, zf, s, dt), acc1)
        else:
            acc = tl.dot(x0, _plane(p, 0, zf, s, dt), acc)
            acc1 = tl.dot(x1, _plane(p, 1, zf, s, dt), acc1)
            acc = tl.dot(x2, _plane(p, 2, zf, s, dt), acc)
            acc1 = tl.dot(x3, _plane(p, 3, zf, s, dt), acc1)
            acc = tl.dot(x4, _plane(p, 4, zf, s, dt), acc)
            acc1 = tl.dot(x5, _plane(p, 5, zf, s, dt), acc1)
            acc = tl.dot(x6, _plane(p, 6, zf, s, dt), acc)
            acc1 = tl.dot(x7, _plane(p, 7, zf, s, dt), acc1)
        a_ptrs += BLOCK_K
        b_ptrs += KW * N
    acc += acc1
    _finish(acc, out_ptr, bias_ptr, ws_ptr, cnt_ptr, pid, pid_k, offs_m, offs_n, M, N, stride_om, SPLIT_K,
            HAS_BIAS, IS_SPLIT, SPLIT_P2)


def planes_cfg(bm: int, bn: int, bk: int, kper: int, warps: int, stages: int, math: int = 2, group_m: int = 8) -> dict:
    """A candidate of this kernel; BLOCK_K >= 128 (each plane's dot needs K >= 16). ``math=2``: the
    words unpacked by PTX (:data:`_PAIR_ASM`, GPU only); ``math=0``: by Triton operations (any backend)."""
    return dict(KIND=KIND, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, KPER=kper, MATH=math, UNPACK=0, GROUP_M=group_m,
                num_warps=warps, num_stages=stages)


def candidates(bucket: int, m: int) -> list[dict]:
    """Tiles per bucket of rows (see ``triton_gemm._m_bucket``), K split over programs. Kept to tiles that
    compile for sm_90 without spilling (ptxas report); 64 rows use wgmma, whose B operand (the
    dequantized weights) passes through shared memory, fewer rows ``mma.sync`` straight from registers.
    From 65 rows on, the plain kernel or dequantize-then-cuBLAS won every 7B shape on an H200: none here.
    The PTX unpacking cannot run in Triton's CPU interpreter: there only ``math=0`` is offered."""
    if bucket <= 16:
        out = [planes_cfg(16, 64, 128, 512, 4, 4), planes_cfg(16, 64, 128, 1024, 4, 4), planes_cfg(16, 128, 128, 512, 4, 3),
               planes_cfg(16, 64, 128, 256, 4, 4), planes_cfg(16, 64, 128, 512, 4, 4, 0), planes_cfg(16, 64, 128, 1024, 4, 4, 0)]
    elif bucket in (32, 64):
        out = [planes_cfg(32, 64, 128, 1024, 4, 4), planes_cfg(16, 64, 128, 1024, 4, 4), planes_cfg(32, 64, 128, 512, 4, 4),
               planes_cfg(32, 64, 128, 1024, 4, 4, 0)]
        if m > 32:
            out += [planes_cfg(64, 64, 128, 1024, 4, 4), planes_cfg(64, 64, 128, 512, 4, 3), planes_cfg(64, 64, 128, 1024, 4, 4, 0)]
    else:
        out = []
    return [c for c in out if not (INTERPRET and c["MATH"] == 2)]


def resolve(cfg: dict, k: int, split_ok: bool) -> dict | None:
    """The candidate for this K: K_PER a multiple of BLOCK_K, the last program's slice possibly shorter
    (K = 11008 splits as 10 x 1024 + 768 instead of 43 x 256: far fewer partial sums to add up)."""
    bk = cfg["BLOCK_K"]
    if k % bk:
        return None
    kper = k if not cfg["KPER"] or not split_ok else max(bk, min(cfg["KPER"], k) // bk * bk)
    return dict(cfg, K_PER=kper, SPLIT_K=triton.cdiv(k, kper))


def launch(cfg: dict, x, packed, scales, zeros, bias, out, group: int, split_args: dict) -> None:
    m, k = x.shape
    n = packed.shape[1]
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    _int4_planes_kernel[grid](
        x, packed, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out,
        M=m, N=n, K=k, G=group, stride_am=x.stride(0), stride_om=out.stride(0),
        HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None, ONE_GROUP=group % cfg["BLOCK_K"] == 0, MATH=cfg.get("MATH", 0),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **split_args,
    )
