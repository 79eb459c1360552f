"""INT8 GEMMs for Hopper: operands brought in by the tensor-memory accelerator (TMA).

The pointer-based INT8 GEMM of :mod:`.triton_gemm` reaches about half of the H100's INT8
tensor-core rate at large M. Loading the tiles through TMA descriptors lets Triton pipeline
them with bulk copies completing on barriers (no address arithmetic per element, no register
staging) and feed ``wgmma`` straight from shared memory. Two forms are offered to the tuner:

* one program per output tile (grouped order, as in the pointer kernel);
* a persistent grid of one program per multiprocessor walking the tiles, its tile and K loops
  flattened so the loads of the next tile overlap the epilogue of the current one.

The epilogue is the pointer kernel's: ``acc * sx[m] * sw[n] (+ bias)`` in float32, rounded once.
TMA needs compute capability 9.0, 16-byte aligned operands and row strides; other inputs use
the pointer kernel.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from sqdeploy.kernels.triton_tiles import _store_out, _tile_ids

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # kernels run on the CPU (tests)


@triton.jit
def _epilogue(acc, as_ptr, bs_ptr, bias_ptr, out_ptr, off_m, off_n, M, N, stride_om,
              A_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    if A_PER_ROW:
        sa = tl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    else:
        sa = tl.load(as_ptr)
    sb = tl.load(bs_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    _store_out(acc.to(tl.float32) * sa * sb, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS)


@triton.jit
def _int8_tma_kernel(a_desc, b_desc, as_ptr, bs_ptr, bias_ptr, out_ptr, M, N, K, stride_om,
                     A_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, K, BLOCK_K):
        a = a_desc.load([off_m, k])
        b = b_desc.load([off_n, k])  # W is [N, K]: a K-major tile, as the INT8 tensor cores want it
        acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
    _epilogue(acc, as_ptr, bs_ptr, bias_ptr, out_ptr, off_m, off_n, M, N, stride_om, A_PER_ROW, HAS_BIAS,
              BLOCK_M, BLOCK_N)


@triton.jit
def _int8_tma_persistent_kernel(a_desc, b_desc, as_ptr, bs_ptr, bias_ptr, out_ptr, M, N, K, stride_om,
                                A_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                                NUM_PROGRAMS: tl.constexpr):
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_ids(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for kk in range(k_tiles):
            a = a_desc.load([off_m, kk * BLOCK_K])
            b = b_desc.load([off_n, kk * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        _epilogue(acc, as_ptr, bs_ptr, bias_ptr, out_ptr, off_m, off_n, M, N, stride_om, A_PER_ROW, HAS_BIAS,
                  BLOCK_M, BLOCK_N)


# ------------------------------------------------------------------ candidates and launch

def tma_cfg(kind: str, bm: int, bn: int, bk: int, warps: int, stages: int, group_m: int = 8) -> dict:
    return dict(KIND=kind, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, KPER=0, UNPACK=0, GROUP_M=group_m,
                num_warps=warps, num_stages=stages)


# large-M tiles: 128x256 or 256x128 with 128-deep K steps (48 KiB a stage), 4 stages, 8 warps (the
# fastest of a wider sweep on an H100 at M = 2048; 64-deep steps and 128x128 tiles were 10-25% slower)
LARGE_M = [
    tma_cfg("tma", 128, 256, 128, 8, 4), tma_cfg("tma", 256, 128, 128, 8, 4), tma_cfg("tma_p", 128, 256, 128, 8, 4),
    tma_cfg("tma_p", 256, 128, 128, 8, 4), tma_cfg("tma", 128, 256, 128, 8, 4, 4), tma_cfg("tma", 128, 256, 128, 8, 4, 16),
]
MID_M = [tma_cfg("tma", 64, 128, 128, 4, 4), tma_cfg("tma", 128, 128, 128, 8, 4), tma_cfg("tma", 64, 256, 128, 8, 4)]


@functools.lru_cache(maxsize=None)
def supported(device_index: int) -> bool:
    if TRITON_INTERPRET:
        return True
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    if TRITON_INTERPRET:
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def candidates(m_bucket: int, device: torch.device) -> list[dict]:
    if device.type != "cuda" and not TRITON_INTERPRET:
        return []
    if not supported(device.index or 0):
        return []
    return LARGE_M if m_bucket > 256 else MID_M if m_bucket == 256 else []


def aligned(*tensors: torch.Tensor) -> bool:
    return all(t.data_ptr() % 16 == 0 and (t.dim() < 2 or t.stride(0) % 16 == 0) and t.stride(-1) == 1 for t in tensors)


def launch(cfg: dict, qx, sx, qw, sw, bias, out) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = qx.shape
    n = qw.shape[0]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    a_desc = TensorDescriptor(qx, [m, k], [qx.stride(0), 1], [bm, bk])
    b_desc = TensorDescriptor(qw, [n, k], [qw.stride(0), 1], [bn, bk])
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    args = dict(M=m, N=n, K=k, stride_om=out.stride(0), A_PER_ROW=sx.numel() != 1, HAS_BIAS=bias is not None,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])
    b = bias if bias is not None else sw
    if cfg["KIND"] == "tma_p":
        progs = min(tiles, _num_sms(qx.device.index or 0))
        _int8_tma_persistent_kernel[(progs,)](a_desc, b_desc, sx, sw, b, out, NUM_PROGRAMS=progs, **args)
    else:
        _int8_tma_kernel[(tiles,)](a_desc, b_desc, sx, sw, b, out, **args)

