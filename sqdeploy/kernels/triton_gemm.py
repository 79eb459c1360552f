"""Triton GEMMs: INT8 x INT8 with the dequantization in the epilogue, and INT4-weight x FP16.

* ``int8_gemm``: ``y = (qx @ qw^T) * sx[m] * sw[n] (+ b)``, INT32 accumulation on the INT8
  tensor cores, the per-token (or per-tensor) x per-channel scaling fused into the
  epilogue, FP16/BF16 out.
* ``int4_gemm``: ``y = x @ ((q - z) * s)^T (+ b)`` for group-wise INT4 weights packed
  ``[K/8, N]`` (see :mod:`.packing`): a GEMV for one row (decode at batch 1), a
  tensor-core GEMM that dequantizes each weight tile in registers, and for large M a
  dequantize-then-cuBLAS path (whichever the dispatch table says is faster).

Small M leaves most multiprocessors idle, so the K loop can be split across programs
(``K_PER`` columns each). The partial sums go to a float32 workspace and the last program of a
tile to arrive (counted with an atomic) adds them in a fixed order and writes the
output: exact float32 accumulation, deterministic, and no extra kernel launch, which
matters under CUDA graphs where the decode step is a few hundred launches long.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sqdeploy.kernels import gemlite_int4, triton_gemv, triton_int4_planes, triton_int8_gemv, triton_int8_tma
from sqdeploy.kernels.triton_fused import ACT_CODES
from sqdeploy.kernels.triton_tiles import _counters, _finish, _tile_ids
from sqdeploy.kernels.tuning import Tuner

SPLITK_ENABLED = True  # cleared by the benchmark's self-test if the split-K reduction misbehaves


@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, as_ptr, bs_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                      M, N, K, K_PER, SPLIT_K, stride_am, stride_om,
                      A_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _tile_ids(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M  # rows past the end read row 0..: in bounds, never stored
    rn = offs_n % N
    offs_k = pid_k * K_PER + tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + rn[None, :].to(tl.int64) * K + offs_k[:, None]  # W is [N, K]: a K-major [BK, BN] tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for _ in range(0, K_PER, BLOCK_K):
        acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if A_PER_ROW:
        sa = tl.load(as_ptr + rm)[:, None]
    else:
        sa = tl.load(as_ptr)
    y = acc.to(tl.float32) * sa * tl.load(bs_ptr + rn)[None, :]
    _finish(y, out_ptr, bias_ptr, ws_ptr, cnt_ptr, pid, pid_k, offs_m, offs_n, M, N, stride_om, SPLIT_K,
            HAS_BIAS, IS_SPLIT, SPLIT_P2)


@triton.jit
def _unpack(p, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BK/8, BN] int32 words -> [BK, BN] nibbles (row 8j+i is nibble i of word row j)."""
    shifts = (tl.arange(0, 8) * 4)[None, :, None]
    return tl.reshape((p[:, None, :] >> shifts) & 0xF, (BLOCK_K, BLOCK_N))


@triton.jit
def _dequant_tile(q, s_ptr, z_ptr, g, N, rn, HAS_ZERO: tl.constexpr):
    """(q - z) * s of a [BK, BN] nibble tile: 0x6400 | q is the float16 1024 + q, so no int->float conversion."""
    s = tl.load(s_ptr + g * N + rn)
    if HAS_ZERO:
        zf = tl.load(z_ptr + g * N + rn).to(tl.float16) + 1024.0
    else:
        zf = tl.full(rn.shape, 1032.0, tl.float16)
    qf = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    return (qf - zf[None, :]).to(s.dtype) * s[None, :]


@triton.jit
def _int4_gemm_kernel(a_ptr, b_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                      M, N, K, G, K_PER, SPLIT_K, stride_am, stride_om,
                      HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr,
                      UNPACK: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _tile_ids(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M
    rn = offs_n % N
    k0 = pid_k * K_PER
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + (k0 + offs_k)[None, :]
    if UNPACK == 0:  # load each word once, unpack with a reshape
        b_ptrs = b_ptr + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[:, None].to(tl.int64) * N + rn[None, :]
    else:  # load each word once per nibble (the repeats hit L1), unpack with a per-row shift
        b_ptrs = b_ptr + ((k0 + offs_k) // 8)[:, None].to(tl.int64) * N + rn[None, :]
        shift = ((offs_k % 8) * 4)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k0, k0 + K_PER, BLOCK_K):
        a = tl.load(a_ptrs)
        if UNPACK == 0:
            q = _unpack(tl.load(b_ptrs), BLOCK_K, BLOCK_N)
        else:
            q = (tl.load(b_ptrs) >> shift) & 0xF
        w = _dequant_tile(q, s_ptr, z_ptr, k // G, N, rn, HAS_ZERO)  # BLOCK_K divides G: one group per tile
        acc = tl.dot(a, w.to(a.dtype), acc)
        a_ptrs += BLOCK_K
        b_ptrs += (BLOCK_K // 8) * N
    _finish(acc, out_ptr, bias_ptr, ws_ptr, cnt_ptr, pid, pid_k, offs_m, offs_n, M, N, stride_om, SPLIT_K,
            HAS_BIAS, IS_SPLIT, SPLIT_P2)


@triton.jit
def _int4_dequant_kernel(b_ptr, s_ptr, z_ptr, out_ptr, N, K, G, HAS_ZERO: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed INT4 -> dense ``[K, N]`` weight (so cuBLAS can take large-M products)."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    k0 = pid_k * BLOCK_K
    p = tl.load(b_ptr + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[:, None].to(tl.int64) * N + rn[None, :])
    w = _dequant_tile(_unpack(p, BLOCK_K, BLOCK_N), s_ptr, z_ptr, k0 // G, N, rn, HAS_ZERO)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_k[:, None].to(tl.int64) * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(offs_n < N)[None, :])


# ------------------------------------------------------------------ candidates and launches
#
# A candidate fixes the tile (BLOCK_M/N/K), the warps and pipeline depth, and KPER: how
# many K columns one program covers (0 = all of them; otherwise K is split over
# K / KPER programs per output tile, for small M where tiles alone leave SMs idle).

def _cfg(bm, bn, bk, kper, warps, stages, unpack=0, group_m=8) -> dict:
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, KPER=kper, UNPACK=unpack, GROUP_M=group_m,
                num_warps=warps, num_stages=stages)


def _m_bucket(m: int) -> int:
    return 1 if m == 1 else 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 256 if m <= 256 else 4096


def _int8_candidates(m: int) -> list[dict]:
    b = _m_bucket(m)
    if b <= 16:
        return [_cfg(16, 64, 128, 0, 4, 4), _cfg(16, 32, 128, 0, 4, 5), _cfg(16, 64, 256, 0, 4, 3),
                _cfg(16, 64, 128, 1024, 4, 4), _cfg(16, 128, 128, 512, 4, 4), _cfg(16, 64, 256, 512, 4, 3),
                _cfg(16, 128, 256, 1024, 4, 3), _cfg(16, 32, 256, 1024, 4, 3)]
    if b in (32, 64):  # decode at batch 17-32 and 33-64: tuned apart
        bm = 32 if m <= 32 else 64
        return [_cfg(bm, 64, 128, 0, 4, 4), _cfg(bm, 128, 128, 0, 4, 4), _cfg(bm, 64, 128, 1024, 4, 4),
                _cfg(bm, 128, 128, 1024, 4, 3), _cfg(bm, 128, 256, 2048, 4, 3)]
    if b == 256:
        return [_cfg(64, 128, 128, 0, 4, 4), _cfg(128, 128, 128, 0, 8, 3), _cfg(64, 256, 128, 0, 8, 3),
                _cfg(128, 64, 128, 0, 4, 4), _cfg(128, 256, 128, 0, 8, 3)]
    return [_cfg(128, 256, 128, 0, 8, 3), _cfg(256, 128, 128, 0, 8, 3), _cfg(128, 128, 128, 0, 8, 4),
            _cfg(128, 256, 128, 0, 8, 4), _cfg(256, 128, 128, 0, 8, 4), _cfg(128, 256, 64, 0, 8, 5),
            _cfg(256, 128, 64, 0, 8, 5), _cfg(128, 128, 64, 0, 4, 4, group_m=16)]


def _int4_candidates(m: int) -> list[dict]:
    b = _m_bucket(m)
    if b == 1:  # the one-row GEMV's candidates live with its kernel
        return triton_gemv.CANDIDATES
    if b <= 16:
        return [_cfg(16, 64, 128, 512, 4, 4, 1), _cfg(16, 64, 128, 512, 4, 4, 0), _cfg(16, 128, 128, 1024, 4, 3, 1),
                _cfg(16, 32, 128, 512, 4, 4, 1), _cfg(16, 64, 64, 256, 4, 4, 1), _cfg(16, 128, 64, 512, 4, 4, 1),
                _cfg(16, 64, 128, 0, 4, 4, 1)]
    if b in (32, 64):  # decode at batch 17-32 and 33-64: tuned apart
        bm = 32 if m <= 32 else 64
        return [_cfg(bm, 64, 128, 1024, 4, 4, 1), _cfg(bm, 128, 128, 1024, 4, 3, 1), _cfg(bm, 64, 128, 512, 4, 4, 0),
                _cfg(bm, 128, 64, 512, 4, 4, 1), _cfg(bm, 64, 128, 0, 4, 4, 1)]
    if b == 256:
        return [_cfg(64, 128, 64, 0, 4, 4, 1), _cfg(128, 128, 64, 0, 8, 3, 1), _cfg(128, 256, 64, 0, 8, 3, 1),
                _cfg(64, 256, 64, 0, 8, 3, 0)]
    return [_cfg(128, 256, 64, 0, 8, 3, 1), _cfg(128, 128, 64, 0, 8, 4, 1), _cfg(256, 128, 64, 0, 8, 3, 1),
            _cfg(128, 128, 128, 0, 8, 3, 0)]


def _resolve(cfg: dict, k: int, group: int | None) -> dict | None:
    """The candidate made concrete for this K (and group), or None if it cannot tile it."""
    bk = cfg["BLOCK_K"] if group is None else min(cfg["BLOCK_K"], group)
    if k % bk or (group is not None and group % bk):
        return None
    kper = k if cfg["KPER"] in (0, None) or not SPLITK_ENABLED else min(cfg["KPER"], k)
    while kper >= max(bk, cfg["KPER"] // 2) and (k % kper or kper % bk):
        kper -= bk  # nearest smaller divisor of K (K = 11008 splits as 43 x 256, not 512s)
    if kper < bk or k % kper or kper % bk:
        return None
    return dict(cfg, BLOCK_K=bk, K_PER=kper, SPLIT_K=k // kper)


def _usable(cands: list[dict], k: int, group: int | None = None, max_split: int = 128) -> list[dict]:
    out = []
    for c in cands:
        r = _resolve(c, k, group)
        if r is not None and r["SPLIT_K"] <= max_split and r not in out:
            out.append(r)
    if not out:
        for bk in (64, 32, 16, 8):  # odd K or small groups: short K tiles, no split
            r = _resolve(dict(cands[0], BLOCK_K=bk, KPER=0), k, group)
            if r is not None:
                return [r]
        raise ValueError(f"no kernel tile fits K={k}, group={group}")
    return out


def int8_candidates(m: int, k: int, device: torch.device) -> list[dict]:
    """Pointer-based tiles (any GPU of compute capability 8.0+), for one row also the ``dp4a`` GEMV
    (:mod:`.triton_int8_gemv`), and on Hopper TMA-fed tiles for large M."""
    out = [c for c in _usable(_int8_candidates(m), k, max_split=32) if Tuner.usable("int8_gemm", c)]
    if m == 1:
        out += [c for c in triton_int8_gemv.candidates(k) if Tuner.usable("int8_gemm", c)]
    for c in triton_int8_tma.candidates(_m_bucket(m), device):
        r = _resolve(c, k, None)
        if r is not None and Tuner.usable("int8_gemm", r):
            out.append(r)
    return out or _usable(_int8_candidates(m), k, max_split=32)


def int4_gemm_candidates(m: int, k: int, group: int, asym: bool, dequant: bool = True) -> list[dict]:
    """Every configuration the W4A16 tuner times for ``m > 1`` rows: the plain tensor-core kernel, the
    plane-wise one (:mod:`.triton_int4_planes`), gemlite's where installed, and (``dequant``) the dense
    weight through cuBLAS, so that the fastest path is chosen per shape and reported."""
    bucket = _m_bucket(m)
    out = _usable(_int4_candidates(m), k, group, max_split=32)
    for c in triton_int4_planes.candidates(bucket, m):
        r = triton_int4_planes.resolve(c, k, SPLITK_ENABLED)  # any group size that is a multiple of 8
        if r is not None and r["SPLIT_K"] <= 64 and r not in out:
            out.append(r)
    out += gemlite_int4.candidates(64 if bucket == 32 else bucket, group, asym)
    if dequant and bucket >= 64:
        out.append(dict(KIND=DEQUANT_KIND, KPER=0, K_PER=k, SPLIT_K=1))
    usable = [c for c in out if Tuner.usable("int4_gemm", c)]
    return usable or out[:1]


DEQUANT_KIND = "dequant_cublas"


def gemv_candidates(k: int, group: int) -> list[dict]:
    """Every usable configuration of the one-row GEMV (:mod:`.triton_gemv`) for this K and group."""
    out = [c for c in _usable(_int4_candidates(1), k, group) if Tuner.usable("int4_gemv", c)]
    return out or _usable(_int4_candidates(1), k, group)


def one_row_candidates(k: int, group: int, asym: bool, fused_act: bool) -> list[dict]:
    """What the one-row tuner times: the GEMVs, and (plain input) the plane-wise tensor-core kernel's
    PTX-unpacking tiles (one real row of 16) and gemlite's one-row kernel where installed."""
    if fused_act:
        return gemv_candidates(k, group)
    planes = [triton_int4_planes.resolve(c, k, SPLITK_ENABLED) for c in triton_int4_planes.candidates(16, 1)]
    planes = [c for c in planes if c is not None and c["MATH"] == 2 and Tuner.usable("int4_gemv", c)][:3]
    return gemv_candidates(k, group) + planes + gemlite_int4.candidates(1, group, asym)


def _meta(cfg: dict, *names: str) -> dict:
    return {n: cfg[n] for n in names + ("num_warps", "num_stages")}


def _split_args(cfg: dict, m: int, n: int, device) -> dict:
    cnt = _counters(device)
    split = cfg["SPLIT_K"]
    ws = torch.empty((split, m, n), dtype=torch.float32, device=device) if split > 1 else cnt
    return dict(ws_ptr=ws, cnt_ptr=cnt, K_PER=cfg["K_PER"], SPLIT_K=split, IS_SPLIT=split > 1,
                SPLIT_P2=triton.next_power_of_2(split))


_INT8 = Tuner("int8_gemm")
_INT4 = Tuner("int4_gemm")
_INT4_GEMV = Tuner("int4_gemv")


def int8_gemm(qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``qx`` int8 [M, K] (row stride free), ``sx`` float32 [M] or [1], ``qw`` int8 [N, K], ``sw`` float32 [N]."""
    m, k = qx.shape
    n = qw.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=qx.device)

    def launch(cfg):
        if cfg.get("KIND", "").startswith("tma") and triton_int8_tma.aligned(qx, qw):
            return triton_int8_tma.launch(cfg, qx, sx, qw, sw, bias, out)
        if cfg.get("KIND") == triton_int8_gemv.KIND:
            if m == 1 and triton_int8_gemv.aligned(qx, qw):
                args = _split_args(cfg, m, n, qx.device)
                return triton_int8_gemv.launch(cfg, qx, sx, qw, sw, bias, out, args["ws_ptr"], args["cnt_ptr"])
            cfg = _usable(_int8_candidates(m), k, max_split=32)[0]  # operands not word-aligned: a tile
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
        _int8_gemm_kernel[grid](qx, qw, sx, sw, bias if bias is not None else sw, out, M=m, N=n, K=k,
                                stride_am=qx.stride(0), stride_om=out.stride(0), A_PER_ROW=sx.numel() != 1,
                                HAS_BIAS=bias is not None, **_split_args(cfg, m, n, qx.device),
                                **_meta(cfg, "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"))

    _INT8.run((_m_bucket(m), n, k), lambda: int8_candidates(m, k, qx.device), launch)
    return out


def int4_gemm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              group: int, bias: torch.Tensor | None, act: str | None = None, dequant: bool = True) -> torch.Tensor:
    """``x`` [M, K] float16/bfloat16, weights in the :mod:`.packing` layout; returns [M, N] in x's dtype.

    ``act``: ``x`` is a gate|up row ``[1, 2K]`` and the input is ``act(gate) * up``, computed in the
    GEMV (decode only: one row). ``dequant``: the tuner may answer 64+ rows with the dense weight
    through cuBLAS (off: the INT4 kernels only)."""
    m = x.shape[0]
    k = packed.shape[0] * 8
    n = packed.shape[1]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    common = dict(s_ptr=scales, z_ptr=zeros if zeros is not None else scales, out_ptr=out,
                  bias_ptr=bias if bias is not None else scales, N=n, K=k, G=group,
                  HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None)
    if m == 1:
        from sqdeploy.kernels import triton_gemv

        def launch(cfg):
            if cfg.get("KIND") == gemlite_int4.KIND:
                return gemlite_int4.run(cfg, x, packed, scales, zeros, group, bias)
            if cfg.get("KIND") == triton_int4_planes.KIND:
                triton_int4_planes.launch(cfg, x, packed, scales, zeros, bias, out, group, _split_args(cfg, 1, n, x.device))
                return out
            triton_gemv.launch(cfg, x, packed, scales, zeros, bias, out, group, ACT_CODES[act or "identity"],
                               act is not None, _split_args(cfg, 1, n, x.device))
            return out

        return _INT4_GEMV.run((n, k, group, act), lambda: one_row_candidates(k, group, zeros is not None, act is not None),
                              launch)
    if act is not None:
        raise ValueError("the fused activation input is a decode (one-row) path")

    def launch(cfg):
        kind = cfg.get("KIND")
        if kind == gemlite_int4.KIND:
            return gemlite_int4.run(cfg, x, packed, scales, zeros, group, bias)
        if kind == DEQUANT_KIND:
            return torch.nn.functional.linear(x, int4_dequantize(packed, scales, zeros, group, x.dtype).t(), bias)
        if kind == triton_int4_planes.KIND:
            triton_int4_planes.launch(cfg, x, packed, scales, zeros, bias, out, group, _split_args(cfg, m, n, x.device))
            return out
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
        _int4_gemm_kernel[grid](x, packed, **common, M=m, stride_am=x.stride(0), stride_om=out.stride(0),
                                **_split_args(cfg, m, n, x.device),
                                **_meta(cfg, "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "UNPACK"))
        return out

    return _INT4.run((_m_bucket(m), n, k, group, dequant),
                     lambda: int4_gemm_candidates(m, k, group, zeros is not None, dequant), launch)


def int4_choice(m: int, n: int, k: int, group: int, dequant: bool = True) -> str:
    """The configuration the W4A16 tuner chose for this shape, in brief ('-' if none was chosen yet)."""
    cfg = _INT4_GEMV.best.get((n, k, group, None)) if m == 1 else _INT4.best.get((_m_bucket(m), n, k, group, dequant))
    return _brief(cfg, "gemv" if m == 1 else "tc")


def int8_choice(m: int, n: int, k: int) -> str:
    """The configuration the W8A8 tuner chose for this shape, in brief ('-' if none was chosen yet)."""
    return _brief(_INT8.best.get((_m_bucket(m), n, k)), "tc")


def _brief(cfg: dict | None, plain: str) -> str:
    if cfg is None:
        return "-"
    kind = cfg.get("KIND") or plain
    tile = "x".join(str(cfg[x]) for x in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if x in cfg)
    return f"{kind} {tile} split{cfg.get('SPLIT_K', 1)} w{cfg.get('num_warps', '-')}s{cfg.get('num_stages', '-')}".strip()


def int4_dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """The dense weight as ``[K, N]`` (use ``.t()`` for an ``[N, K]`` view)."""
    kp, n = packed.shape
    k = kp * 8
    out = torch.empty((k, n), dtype=dtype, device=packed.device)
    bk = 64 if group % 64 == 0 else 32 if group % 32 == 0 else 8
    grid = (k // bk, triton.cdiv(n, 128))
    _int4_dequant_kernel[grid](packed, scales, zeros if zeros is not None else scales, out, n, k, group,
                               HAS_ZERO=zeros is not None, BLOCK_N=128, BLOCK_K=bk, num_warps=4)
    return out
