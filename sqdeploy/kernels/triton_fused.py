"""Triton kernels around the GEMMs: one pass per row instead of a chain of PyTorch ops.

* ``add_norm``: residual add + RMSNorm/LayerNorm (+ INT8 quantization of the output,
  static or per-token) in one read of the row. Rounding follows the reference model:
  the residual sum and the norm output are rounded to the activation dtype exactly
  where PyTorch rounds them, and only then quantized, so the INT8 values equal what
  :func:`sqdeploy.core.qmath.fake_quant_act` produces from the same input.
* ``act_mul``: ``act(gate) * up`` of the fused gate/up GEMM output (+ quantization);
  with the identity activation it is the standalone one-pass quantizer.
* ``rope_cache``: rotary on q and k, k and v written into a preallocated KV cache at
  the current position, q written out: one launch instead of a dozen.

Quantization divides with IEEE rounding (``div_rn``) and rounds half to even, like
``torch.round(x / s)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sqdeploy.kernels.reference import InputQuant, QAct
from sqdeploy.kernels.tuning import Tuner

QUANT_CODES = {"none": 0, "static": 1, "token": 2}
ACT_CODES = {"identity": -1, "silu": 0, "relu": 1, "gelu": 2, "gelu_new": 3, "gelu_pytorch_tanh": 3}
EPS = 1e-8  # qmath.EPS
CHUNK = 2048  # columns per program (or per pass) of the activation / quantization kernel
WHOLE_ROW_MAX = 16384  # per-token quantization keeps rows up to this wide in registers (one pass)


@triton.jit
def _scale_of_row(amax, scale_ptr, qs_ptr, row, QUANT: tl.constexpr):
    if QUANT == 2:
        s = tl.maximum(tl.math.div_rn(amax, 127.0), 1e-8)
        tl.store(qs_ptr + row, s)
    else:
        s = tl.load(scale_ptr)
    return s


@triton.jit
def _quantize(yf, s):
    v = tl.minimum(tl.maximum(tl.math.div_rn(yf, s), -129.0), 128.0)
    # round half to even: adding 1.5 * 2^23 leaves no fraction bits, and IEEE addition rounds to even
    q = (v + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(q, -128.0), 127.0).to(tl.int8)


@triton.jit
def _add_norm_kernel(x_ptr, d_ptr, h_ptr, w_ptr, nb_ptr, y_ptr, q_ptr, qs_ptr, scale_ptr, N, eps,
                     HAS_DELTA: tl.constexpr, RMS: tl.constexpr, HAS_NBIAS: tl.constexpr,
                     QUANT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * N
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + base + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        x = (x.to(tl.float32) + tl.load(d_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(h_ptr + base + cols, x, mask=mask)
    xf = x.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        y = w * (xf * tl.math.rsqrt(tl.sum(xf * xf, 0) / N + eps))
    else:
        xc = tl.where(mask, xf - tl.sum(xf, 0) / N, 0.0)
        y = xc * tl.math.rsqrt(tl.sum(xc * xc, 0) / N + eps) * w
        if HAS_NBIAS:
            y = y + tl.load(nb_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = y.to(x.dtype)
    if QUANT == 0:
        tl.store(y_ptr + base + cols, y, mask=mask)
    else:
        yf = y.to(tl.float32)
        s = _scale_of_row(tl.max(tl.where(mask, tl.abs(yf), 0.0), 0), scale_ptr, qs_ptr, row, QUANT)
        tl.store(q_ptr + base + cols, _quantize(yf, s), mask=mask)


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:
        return g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        return tl.maximum(g, 0.0)
    elif ACT == 2:
        return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    elif ACT == 3:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return 0.5 * g * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0))
    else:
        return g


@triton.jit
def _act_mul_chunk(h_ptr, base, c, N, GATED: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """float32 values of the reference's rounded ``act(g) * u`` for columns ``c .. c+BLOCK`` (0 past N)."""
    cols = c + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(h_ptr + base + cols, mask=mask, other=0.0)
    y = _act(g.to(tl.float32), ACT).to(g.dtype)
    if GATED:
        u = tl.load(h_ptr + base + N + cols, mask=mask, other=0.0)
        y = (y.to(tl.float32) * u.to(tl.float32)).to(g.dtype)
    return tl.where(mask, y.to(tl.float32), 0.0), cols, mask


@triton.jit
def _act_mul_kernel(h_ptr, y_ptr, q_ptr, qs_ptr, scale_ptr, N, stride_h,
                    GATED: tl.constexpr, ACT: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr,
                    ROW_PASSES: tl.constexpr, BLOCK2: tl.constexpr = 1):
    """ROW_PASSES 0: grid (rows, chunks), one chunk per program (no row-wide value needed).
    Per-token scales need the row's abs-max first: 2 holds the whole row in registers, padded
    to a power of two (one read); 3 holds it as two power-of-two pieces, ``BLOCK`` then
    ``BLOCK2`` columns (11008 = 8192 + 2816 in 8192 + 4096 lanes instead of 16384); 1 makes an
    abs-max pass then a quantizing pass over chunks (the second pass reads from cache)."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * stride_h
    out = row.to(tl.int64) * N
    if ROW_PASSES == 0:
        y, cols, mask = _act_mul_chunk(h_ptr, base, tl.program_id(1) * BLOCK, N, GATED, ACT, BLOCK)
        if QUANT == 0:
            tl.store(y_ptr + out + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(q_ptr + out + cols, _quantize(y, tl.load(scale_ptr)), mask=mask)
    elif ROW_PASSES == 2:  # the whole row in registers (BLOCK >= N): one read of the input
        y, cols, mask = _act_mul_chunk(h_ptr, base, 0, N, GATED, ACT, BLOCK)
        s = _scale_of_row(tl.max(tl.abs(y), 0), scale_ptr, qs_ptr, row, QUANT)
        tl.store(q_ptr + out + cols, _quantize(y, s), mask=mask)
    elif ROW_PASSES == 3:
        y, cols, mask = _act_mul_chunk(h_ptr, base, 0, N, GATED, ACT, BLOCK)
        y2, cols2, mask2 = _act_mul_chunk(h_ptr, base, BLOCK, N, GATED, ACT, BLOCK2)
        s = _scale_of_row(tl.maximum(tl.max(tl.abs(y), 0), tl.max(tl.abs(y2), 0)), scale_ptr, qs_ptr, row, QUANT)
        tl.store(q_ptr + out + cols, _quantize(y, s), mask=mask)
        tl.store(q_ptr + out + cols2, _quantize(y2, s), mask=mask2)
    else:
        amax = 0.0
        for c in range(0, N, BLOCK):
            y, cols, mask = _act_mul_chunk(h_ptr, base, c, N, GATED, ACT, BLOCK)
            amax = tl.maximum(amax, tl.max(tl.abs(y), 0))
        s = _scale_of_row(amax, scale_ptr, qs_ptr, row, QUANT)
        for c in range(0, N, BLOCK):
            y, cols, mask = _act_mul_chunk(h_ptr, base, c, N, GATED, ACT, BLOCK)
            tl.store(q_ptr + out + cols, _quantize(y, s), mask=mask)


@triton.jit
def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, pos_ptr, T, H, HKV, TMAX, stride_row,
                       HAS_ROPE: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr):
    """One token's heads ``BLOCK_H`` at a time (q heads, then k, then v): its cos/sin are read once."""
    row = tl.program_id(0)  # b * T + t
    head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    live = head < H + 2 * HKV
    b = row // T
    pos = tl.load(pos_ptr) + row % T
    HALF: tl.constexpr = D // 2
    offs = tl.arange(0, HALF)[None, :]
    src = qkv_ptr + row.to(tl.int64) * stride_row + head * D
    x1 = tl.load(src + offs, mask=live, other=0.0)
    x2 = tl.load(src + HALF + offs, mask=live, other=0.0)
    if HAS_ROPE:
        dt = x1.dtype
        c1 = tl.load(cos_ptr + row * D + offs).to(tl.float32)
        c2 = tl.load(cos_ptr + row * D + HALF + offs).to(tl.float32)
        s1 = tl.load(sin_ptr + row * D + offs).to(tl.float32)
        s2 = tl.load(sin_ptr + row * D + HALF + offs).to(tl.float32)
        a1 = x1.to(tl.float32)
        a2 = x2.to(tl.float32)
        # x * cos + rotate_half(x) * sin, each product rounded like the reference's half ops
        r1 = ((a1 * c1).to(dt).to(tl.float32) + (-a2 * s1).to(dt).to(tl.float32)).to(dt)
        r2 = ((a2 * c2).to(dt).to(tl.float32) + (a1 * s2).to(dt).to(tl.float32)).to(dt)
        rotated = head < H + HKV
        x1 = tl.where(rotated, r1, x1)
        x2 = tl.where(rotated, r2, x2)
    kvh = tl.where(head < H + HKV, head - H, head - H - HKV)
    cache_off = ((b.to(tl.int64) * HKV + kvh) * TMAX + pos) * D
    q_off = (row.to(tl.int64) * H + head) * D
    dst = tl.where(head < H, q_ptr + q_off, tl.where(head < H + HKV, k_ptr + cache_off, v_ptr + cache_off))
    tl.store(dst + offs, x1, mask=live)
    tl.store(dst + HALF + offs, x2, mask=live)


# ------------------------------------------------------------------ launches

def _warps(block: int) -> int:
    return 4 if block <= 4096 else 8 if block <= 8192 else 16


def add_norm(x: torch.Tensor, delta: torch.Tensor | None, norm, iq: InputQuant):
    """2-D ``x`` (and ``delta``); ``norm`` is the reference :class:`~sqdeploy.model.layers.Norm` module."""
    m, n = x.shape
    h = torch.empty_like(x) if delta is not None else x
    block = triton.next_power_of_2(n)
    quant = QUANT_CODES[iq.kind]
    y = torch.empty_like(x) if quant == 0 else x
    q = torch.empty((m, n), dtype=torch.int8, device=x.device) if quant else x
    qs = torch.empty(m, dtype=torch.float32, device=x.device) if quant == 2 else x
    scale = iq.scale if quant == 1 else qs
    nb = norm.bias if norm.bias is not None else norm.weight
    _add_norm_kernel[(m,)](x, delta if delta is not None else x, h, norm.weight, nb, y, q, qs, scale, n, norm.eps,
                           HAS_DELTA=delta is not None, RMS=norm.kind == "rms", HAS_NBIAS=norm.bias is not None,
                           QUANT=quant, BLOCK=block, num_warps=_warps(block))
    if quant == 0:
        return h, y
    return h, QAct(q, qs if quant == 2 else iq.scale)


def token_row_forms(n: int) -> list[dict]:
    """Launch forms of the per-token act*mul+quantization kernel for rows of ``n`` columns: the
    first is the default (what runs untimed: CPU interpreter, CUDA-graph capture)."""
    if n > WHOLE_ROW_MAX:
        return [dict(ROW_PASSES=1, BLOCK=CHUNK, BLOCK2=1, num_warps=4)]
    full = triton.next_power_of_2(n)
    forms = [dict(ROW_PASSES=2, BLOCK=full, BLOCK2=1, num_warps=max(4, min(16, full // 1024)))]
    head = full // 2
    if full != n and head >= 1024:  # n not a power of two: two pieces waste fewer lanes than one
        tail = triton.next_power_of_2(n - head)
        forms += [dict(ROW_PASSES=3, BLOCK=head, BLOCK2=tail, num_warps=w) for w in (8, 16)]
    forms += [dict(ROW_PASSES=1, BLOCK=b, BLOCK2=1, num_warps=w) for b, w in ((2048, 4), (4096, 8)) if b < n]
    return forms


_TOKEN_ROWS = Tuner("act_mul_token")


def act_mul(h: torch.Tensor, act: str, gated: bool, iq: InputQuant):
    """``h`` [M, 2I] (gated) or [M, I]; identity + quantization = the standalone quantizer."""
    m, width = h.shape
    n = width // 2 if gated else width
    quant = QUANT_CODES[iq.kind]
    y = torch.empty((m, n), dtype=h.dtype, device=h.device) if quant == 0 else h
    q = torch.empty((m, n), dtype=torch.int8, device=h.device) if quant else h
    qs = torch.empty(m, dtype=torch.float32, device=h.device) if quant == 2 else h
    scale = iq.scale if quant == 1 else qs
    common = dict(GATED=gated, ACT=ACT_CODES[act], QUANT=quant)
    if quant == 2:
        def launch(cfg):
            _act_mul_kernel[(m,)](h, y, q, qs, scale, n, h.stride(0), **common, **cfg)

        _TOKEN_ROWS.run((n, 1 if m == 1 else 64 if m <= 64 else 4096), lambda: token_row_forms(n), launch)
    else:
        block = min(triton.next_power_of_2(n), CHUNK)
        _act_mul_kernel[(m, triton.cdiv(n, block))](h, y, q, qs, scale, n, h.stride(0), **common, BLOCK=block,
                                                     ROW_PASSES=0, num_warps=4)
    if quant == 0:
        return y
    return QAct(q, qs if quant == 2 else iq.scale)


def quantize(x: torch.Tensor, iq: InputQuant) -> QAct:
    if iq.kind == "tensor":  # a whole-tensor abs-max needs its own pass
        scale = (x.abs().amax().float() / 127.0).clamp_min(EPS).reshape(1)
        iq = InputQuant("static", scale)
    return act_mul(x, "identity", False, iq)


def rope_cache(qkv: torch.Tensor, cos, sin, k_cache: torch.Tensor, v_cache: torch.Tensor, start: torch.Tensor,
               heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    b, t, width = qkv.shape
    q = torch.empty((b, t, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    has_rope = cos is not None
    c = cos.to(qkv.dtype).contiguous() if has_rope else qkv
    s = sin.to(qkv.dtype).contiguous() if has_rope else qkv
    block_h = min(16, triton.next_power_of_2(heads + 2 * kv_heads))
    grid = (b * t, triton.cdiv(heads + 2 * kv_heads, block_h))
    _rope_cache_kernel[grid](qkv, c, s, q, k_cache, v_cache, start, t, heads, kv_heads, k_cache.shape[2],
                             qkv.stride(1), HAS_ROPE=has_rope, D=head_dim, BLOCK_H=block_h,
                             num_warps=4 if block_h * head_dim >= 1024 else 1)
    return q


def rope_qkv(qkv: torch.Tensor, cos, sin, heads: int, kv_heads: int, head_dim: int):
    """Rotary on a fused projection ``[B, T, (H + 2 Hkv) D]`` without a cache: q ``[B, T, H, D]``,
    k and v ``[B, Hkv, T, D]``, each contiguous."""
    b, t, _ = qkv.shape
    k = torch.empty((b, kv_heads, t, head_dim), dtype=qkv.dtype, device=qkv.device)
    v = torch.empty_like(k)
    start = torch.zeros(1, dtype=torch.long, device=qkv.device)
    return rope_cache(qkv, cos, sin, k, v, start, heads, kv_heads, head_dim), k, v
