"""Pieces every tiled Triton kernel here shares: the grouped tile order, the epilogue that
stores a tile (with bias), and the deterministic split-K reduction (the last program to
arrive for a tile sums the partial tiles in a fixed order, so results do not change run to
run, unlike atomic adds).

Kept apart from the kernels so that each kernel module imports it and none imports another.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_COUNTERS: dict[torch.device, torch.Tensor] = {}
_MAX_TILES = 1 << 16


def _counters(device: torch.device) -> torch.Tensor:
    c = _COUNTERS.get(device)
    if c is None:  # zeroed once; every split-K launch leaves its counters at zero again
        c = _COUNTERS[device] = torch.zeros(_MAX_TILES, dtype=torch.int32, device=device)
    return c


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row-tiles share each weight tile while it is in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _store_out(y, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finish(y, out_ptr, bias_ptr, ws_ptr, cnt_ptr, tile, pid_k, offs_m, offs_n, M, N, stride_om, SPLIT_K,
            HAS_BIAS: tl.constexpr, IS_SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr):
    """Write a float32 tile; split over K, the last of the tile's programs to arrive reduces the partials
    (all SPLIT_P2 >= SPLIT_K loads issued at once: a loop of dependent L2 round trips would be the tail)."""
    if not IS_SPLIT:
        _store_out(y, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS)
    else:
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        part = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part + pid_k * M * N, y, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the arrival is published
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros_like(y)
            for s in tl.static_range(SPLIT_P2):  # fixed order: the result does not depend on arrival order
                total += tl.load(part + s * M * N, mask=mask & (s < SPLIT_K), other=0.0, cache_modifier=".cg")
            _store_out(total, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")
