"""Dispatch: Triton kernels for CUDA tensors, the exact PyTorch arithmetic of
:mod:`.reference` for everything else (CPU tests, a GPU-less fallback)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sqdeploy.kernels import reference as ref
from sqdeploy.kernels.packing import Int4Weight, Int8Weight
from sqdeploy.kernels.reference import InputQuant, QAct

# INT4 products with more rows than this dequantize the weight once and call cuBLAS without asking the
# tuner; up to it, the tuner times the INT4 kernels and (64+ rows, INT4_TUNE_DEQUANT) dequantize-then-cuBLAS
# per shape and keeps the fastest (the GPU benchmark reports which).
INT4_FUSED_MAX_M = 1 << 30
INT4_TUNE_DEQUANT = True
# Decode (one row) W4A16 MLPs may compute act(gate) * up inside the down projection's GEMV. Off: on an
# H100 the separate act*mul kernel plus the plain GEMV took 19.0 us for a 7B layer, the fused GEMV 23.4 us
# (the activation is recomputed by every thread that holds a column of the row).
FUSE_ACT_INTO_GEMV = False
# Decode steps over the static cache use the Triton flash-decoding kernel instead of SDPA
DECODE_ATTENTION = True


# Route CPU tensors through the Triton kernels too: only meaningful under TRITON_INTERPRET=1,
# where the test suite runs the kernels' own code on the CPU.
FORCE_TRITON = False


def _gpu(t: torch.Tensor) -> bool:
    return t.is_cuda or FORCE_TRITON


def add_norm(x: torch.Tensor, delta: torch.Tensor | None, norm, iq: InputQuant):
    if _gpu(x):
        from sqdeploy.kernels import triton_fused

        fused_iq = iq if iq.kind in ("none", "static", "token") else InputQuant()
        h, y = triton_fused.add_norm(x, delta, norm, fused_iq)
        return h, (quantize(y, iq) if fused_iq.kind != iq.kind else y)
    return ref.add_norm(x, delta, norm, iq)


def quantize(x: torch.Tensor, iq: InputQuant) -> QAct:
    if _gpu(x):
        from sqdeploy.kernels import triton_fused

        return triton_fused.quantize(x.contiguous(), iq)
    return ref.quantize(x, iq)


def act_mul(h: torch.Tensor, act: str, gated: bool, iq: InputQuant):
    if _gpu(h):
        from sqdeploy.kernels import triton_fused

        fused_iq = iq if iq.kind in ("none", "static", "token") else InputQuant()
        y = triton_fused.act_mul(h, act, gated, fused_iq)
        return quantize(y, iq) if fused_iq.kind != iq.kind else y
    return ref.act_mul(h, act, gated, iq)


def int8_linear(qa: QAct, w: Int8Weight, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    if _gpu(qa.q):
        from sqdeploy.kernels import triton_gemm

        return triton_gemm.int8_gemm(qa.q, qa.scale, w.q, w.scale, bias, out_dtype)
    return ref.int8_linear(qa, w, bias, out_dtype)


def int4_linear(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    if not _gpu(x):
        return ref.int4_linear(x, w, bias)
    from sqdeploy.kernels import triton_gemm

    x = x.contiguous()
    if x.shape[0] > INT4_FUSED_MAX_M:
        dense = triton_gemm.int4_dequantize(w.packed, w.scales, w.zeros, w.group_size, x.dtype)
        return F.linear(x, dense.t(), bias)
    return triton_gemm.int4_gemm(x, w.packed, w.scales, w.zeros, w.group_size, bias, dequant=INT4_TUNE_DEQUANT)


def _pow2(d: int) -> bool:
    return d >= 4 and d & (d - 1) == 0


def int4_linear_act(gu: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    """``int4_linear(act(gate) * up)`` of a fused gate|up output; one GPU row computes it inside the GEMV."""
    if _gpu(gu) and gu.shape[0] == 1 and FUSE_ACT_INTO_GEMV:
        from sqdeploy.kernels import triton_gemm

        return triton_gemm.int4_gemm(gu.contiguous(), w.packed, w.scales, w.zeros, w.group_size, bias, act=act)
    return int4_linear(act_mul(gu, act, True, InputQuant()), w, bias)


def decode_attention(q, k_cache, v_cache, length, window: int | None):
    """Attention of one query per row over the static cache, or None where SDPA should do it."""
    if not (_gpu(q) and DECODE_ATTENTION):
        return None
    from sqdeploy.kernels import triton_attention

    if not triton_attention.supported(q.shape[1], k_cache.shape[1], q.shape[2]):
        return None
    return triton_attention.decode_attention(q.contiguous(), k_cache, v_cache, length, window)


def rope_qkv(qkv, cos, sin, heads: int, kv_heads: int, head_dim: int):
    if _gpu(qkv) and _pow2(head_dim):
        from sqdeploy.kernels import triton_fused

        return triton_fused.rope_qkv(qkv.contiguous(), cos, sin, heads, kv_heads, head_dim)
    return ref.rope_qkv(qkv, cos, sin, heads, kv_heads, head_dim)


def rope_cache(qkv, cos, sin, k_cache, v_cache, start, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    if _gpu(qkv) and _pow2(head_dim):
        from sqdeploy.kernels import triton_fused

        return triton_fused.rope_cache(qkv.contiguous(), cos, sin, k_cache, v_cache, start, heads, kv_heads, head_dim)
    return ref.rope_cache(qkv, cos, sin, k_cache, v_cache, start, heads, kv_heads, head_dim)
