"""The kernels' arithmetic in plain PyTorch: what runs off the GPU, and what the GPU is held to.

Every function here computes exactly what the fake-quant reference model computes
(:class:`sqdeploy.model.layers.QLinear` with qmath's conventions), but from the
integer operands: INT8 products are summed exactly (in float64, which holds any
INT8 dot product of realistic length without rounding) and scaled once, INT4 weights
are unpacked and dequantized as qmath does. On the CPU, in float32, a model run
through these functions matches the fake-quant reference to float32 rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from sqdeploy.core import qmath
from sqdeploy.kernels.packing import Int4Weight, Int8Weight, dequantize_int4
from sqdeploy.model.layers import ACTIVATIONS, apply_rotary


class QAct(NamedTuple):
    """INT8 activations ``[M, K]`` with their dequant scale: float32 ``[M]`` per token or ``[1]`` per tensor."""

    q: torch.Tensor
    scale: torch.Tensor


class InputQuant(NamedTuple):
    """How a linear's input is quantized: ``none``, ``static`` (calibrated ``scale``), ``token`` or ``tensor`` (dynamic)."""

    kind: str = "none"
    scale: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return self.kind != "none"


def input_quant(act_kind: str, static_scale: torch.Tensor | None) -> InputQuant:
    kind = {"none": "none", "static_tensor": "static", "dynamic_token": "token", "dynamic_tensor": "tensor"}[act_kind]
    if kind == "static":
        if static_scale is None:
            from sqdeploy.core.errors import SqDeployError

            raise SqDeployError("static INT8 activations need a calibrated input scale; the checkpoint has none")
        return InputQuant(kind, static_scale.float().reshape(1))
    return InputQuant(kind)


def quantize(x: torch.Tensor, iq: InputQuant) -> QAct:
    """INT8 activations of a 2-D ``x`` exactly as :func:`qmath.fake_quant_act` rounds them."""
    xf = x.float()
    if iq.kind == "static":
        scale = iq.scale.to(xf.device).reshape(1)
    elif iq.kind == "tensor":
        scale = qmath.act_scale(xf.abs().amax()).reshape(1)
    else:
        scale = qmath.act_scale(xf.abs().amax(dim=-1))
    q = torch.round(xf / (scale if scale.numel() == 1 else scale[:, None])).clamp(-128, 127).to(torch.int8)
    return QAct(q, scale.float())


def add_norm(x: torch.Tensor, delta: torch.Tensor | None, norm, iq: InputQuant):
    """``h = x + delta`` (the residual), then ``norm(h)``, quantized when ``iq`` says so."""
    h = x if delta is None else x + delta
    y = norm(h)
    return h, (quantize(y, iq) if iq.active else y)


def act_mul(h: torch.Tensor, act: str, gated: bool, iq: InputQuant):
    """``act(gate) * up`` of a fused ``[gate | up]`` output (or ``act(up)``), quantized for the next linear."""
    if gated:
        g, u = h.chunk(2, dim=-1)
        y = ACTIVATIONS[act](g) * u
    else:
        y = ACTIVATIONS[act](h)
    return quantize(y, iq) if iq.active else y


def int8_linear(qa: QAct, w: Int8Weight, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    acc = (qa.q.double() @ w.q.double().t()).float()
    rows = qa.scale if qa.scale.numel() == 1 else qa.scale[:, None]
    y = acc * rows * w.scale
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def int4_linear(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, dequantize_int4(w, x.dtype), bias)


def rope_cache(qkv: torch.Tensor, cos, sin, k_cache: torch.Tensor, v_cache: torch.Tensor, start: torch.Tensor,
               heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Rotary on q and k of a fused ``[B, T, (H + 2 Hkv) D]`` projection; k and v written into a
    preallocated cache at positions ``start ..``; returns q as ``[B, T, H, D]``."""
    q, k, v = rope_qkv(qkv, cos, sin, heads, kv_heads, head_dim)
    idx = start.reshape(1) + torch.arange(qkv.shape[1], device=qkv.device)
    k_cache.index_copy_(2, idx, k.to(k_cache.dtype))
    v_cache.index_copy_(2, idx, v.to(v_cache.dtype))
    return q


def rope_qkv(qkv: torch.Tensor, cos, sin, heads: int, kv_heads: int, head_dim: int):
    """:func:`rope_cache` without a cache: q ``[B, T, H, D]``, k and v ``[B, Hkv, T, D]``."""
    b, t, _ = qkv.shape
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.reshape(b, t, heads, head_dim).transpose(1, 2)
    k = k.reshape(b, t, kv_heads, head_dim).transpose(1, 2)
    v = v.reshape(b, t, kv_heads, head_dim).transpose(1, 2)
    if cos is not None:
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    return q.transpose(1, 2), k, v
