"""Decode attention over the static KV cache: one query per sequence, length read on the device.

SDPA with a mask over the whole preallocated cache costs a few microseconds per layer
more than the bytes it reads, and the length of the valid prefix changes every step,
which a captured CUDA graph cannot pass as a Python number. Here each program takes
one KV head (all the query heads that share it, padded to 16 rows for the tensor
cores) and one chunk of positions, computes a partial softmax (max, sum, weighted V),
and the last program of a head to finish merges the chunks (flash-decoding), with
the same arrival counter as the split-K GEMMs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sqdeploy.kernels.triton_tiles import _counters

MAX_GROUP = 16  # query heads per KV head the kernel handles (padded rows of one MMA tile)


@triton.jit
def _decode_attn_kernel(q_ptr, k_ptr, v_ptr, len_ptr, out_ptr, ws_ptr, cnt_ptr, scale,
                        H, HKV, TMAX, NSPLIT, WINDOW, LEN_STRIDE,
                        G: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, NSPLIT_P2: tl.constexpr):
    bh = tl.program_id(0)  # b * HKV + kv head
    split = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    rows = tl.arange(0, 16)
    dims = tl.arange(0, D)
    live = rows < G
    length = tl.load(len_ptr + b * LEN_STRIDE)
    q = tl.load(q_ptr + ((b * H + hk * G + rows) * D)[:, None] + dims[None, :], mask=live[:, None], other=0.0)
    t = split * CHUNK + tl.arange(0, CHUNK)
    valid = t < length
    if WINDOW > 0:
        valid = valid & (t > length - 1 - WINDOW)
    kv = (bh.to(tl.int64) * TMAX + t)[:, None] * D + dims[None, :]
    k = tl.load(k_ptr + kv, mask=valid[:, None], other=0.0)
    v = tl.load(v_ptr + kv, mask=valid[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k)) * scale  # [16, CHUNK]
    s = tl.where(valid[None, :], s, float("-inf"))
    m = tl.max(s, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp(s - m_safe[:, None])
    l_sum = tl.sum(p, axis=1)
    o = tl.dot(p.to(v.dtype), v)  # [16, D]
    # partials: [bh, split, 16, D + 2] (o, then m, then l)
    base = ws_ptr + (bh.to(tl.int64) * NSPLIT + split) * 16 * (D + 2)
    tl.store(base + rows[:, None] * (D + 2) + dims[None, :], o)
    tl.store(base + rows * (D + 2) + D, m)
    tl.store(base + rows * (D + 2) + D + 1, l_sum)
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel", scope="gpu")
    if arrived == NSPLIT - 1:
        head = ws_ptr + bh.to(tl.int64) * NSPLIT * 16 * (D + 2)
        m_all = tl.full((16,), float("-inf"), tl.float32)
        for i in tl.static_range(NSPLIT_P2):
            mi = tl.load(head + i * 16 * (D + 2) + rows * (D + 2) + D, mask=(rows < 16) & (i < NSPLIT),
                         other=float("-inf"), cache_modifier=".cg")
            m_all = tl.maximum(m_all, mi)
        m_ref = tl.where(m_all == float("-inf"), 0.0, m_all)
        acc = tl.zeros((16, D), tl.float32)
        den = tl.zeros((16,), tl.float32)
        for i in tl.static_range(NSPLIT_P2):
            part = head + i * 16 * (D + 2)
            inside = i < NSPLIT
            mi = tl.load(part + rows * (D + 2) + D, mask=(rows < 16) & inside, other=float("-inf"), cache_modifier=".cg")
            li = tl.load(part + rows * (D + 2) + D + 1, mask=(rows < 16) & inside, other=0.0, cache_modifier=".cg")
            oi = tl.load(part + rows[:, None] * (D + 2) + dims[None, :], mask=((rows < 16) & inside)[:, None],
                         other=0.0, cache_modifier=".cg")
            w = tl.exp(mi - m_ref)
            acc += oi * w[:, None]
            den += li * w
        out = acc / tl.where(den == 0.0, 1.0, den)[:, None]
        tl.store(out_ptr + ((b * H + hk * G + rows) * D)[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=live[:, None])
        tl.atomic_xchg(cnt_ptr + bh, 0, sem="relaxed", scope="gpu")


def supported(heads: int, kv_heads: int, head_dim: int) -> bool:
    g = heads // kv_heads
    return g <= MAX_GROUP and head_dim in (16, 32, 64, 128, 256)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                     window: int | None = None) -> torch.Tensor:
    """``q`` [B, H, D] (one position per row), caches [B, Hkv, Tmax, D], ``length`` int64 valid positions
    (the new one included): ``[1]`` shared by every row, or ``[B]`` one per row (the slot cache of a
    serving batch, whose rows started at different times); returns [B, H, D]."""
    b, h, d = q.shape
    hkv, tmax = k_cache.shape[1], k_cache.shape[2]
    chunk = max(64, triton.next_power_of_2(triton.cdiv(tmax, 16)))
    nsplit = triton.cdiv(tmax, chunk)
    out = torch.empty_like(q)
    ws = torch.empty((b * hkv, nsplit, 16, d + 2), dtype=torch.float32, device=q.device)
    _decode_attn_kernel[(b * hkv, nsplit)](
        q, k_cache, v_cache, length, out, ws, _counters(q.device), 1.0 / math.sqrt(d), h, hkv, tmax, nsplit,
        window or 0, 1 if length.numel() > 1 else 0, G=h // hkv, D=d, CHUNK=chunk, NSPLIT_P2=triton.next_power_of_2(nsplit), num_warps=4,
    )
    return out
