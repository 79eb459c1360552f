"""Quantize / dequantize arithmetic, written once.

The fake-quant reference, the on-disk format, the ONNX and TensorRT-LLM writers and
the GPU kernels all use (or are tested against) these functions, so an integer value
means the same thing everywhere:

* symmetric ``b``-bit:  ``s = amax / (2^(b-1) - 1)``, ``q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)``,
  ``w ~= q * s`` (ModelOpt and TensorRT-LLM use the same convention).
* asymmetric ``b``-bit (SmoothQuant+ eq. 1): ``s = (max - min) / (2^b - 1)``, ``z = round(-min / s)``,
  ``q = clamp(round(w / s) + z, 0, 2^b - 1)``, ``w ~= (q - z) * s``; ``q`` and ``z`` are unsigned.
* activations (INT8, symmetric): ``s = amax / 127``, ``q = clamp(round(x / s), -128, 127)``, matching
  ONNX ``QuantizeLinear`` and TensorRT (round half to even, saturate).

Scales are float32. Groups run along the input dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.schemes import ActScheme, WeightScheme

EPS = 1e-8  # smallest scale: an all-zero group still dequantizes to zeros


@dataclass
class QWeight:
    """An integer weight with its scales: ``q`` [out, in] int8, ``scale``/``zero`` [out, groups]."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]


def num_groups(scheme: WeightScheme, in_features: int) -> int:
    if scheme.granularity == "group":
        return in_features // scheme.group_size
    return 1


def _grouped(w: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """View ``w`` [out, in] as [rows, groups, group_len] so that one scale covers dim 2."""
    out_f, in_f = w.shape
    if scheme.granularity == "tensor":
        return w.reshape(1, 1, out_f * in_f)
    scheme.check_shape("weight", out_f, in_f)
    g = num_groups(scheme, in_f)
    return w.reshape(out_f, g, in_f // g)


def weight_qparams(
    w: torch.Tensor, scheme: WeightScheme, clip: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero points) of ``w``; ``clip`` shrinks each group's range (AWQ clip search)."""
    wg = _grouped(w.float(), scheme)
    if scheme.symmetric:
        amax = wg.abs().amax(dim=-1)
        if clip is not None:
            amax = amax * clip
        return (amax / scheme.qmax).clamp_min(EPS), None
    if scheme.bits != 4:
        raise SqDeployError("asymmetric weights are supported for 4-bit schemes only")
    wmax, wmin = wg.amax(dim=-1), wg.amin(dim=-1)
    if clip is not None:
        wmax, wmin = wmax * clip, wmin * clip
    scale = ((wmax - wmin) / scheme.qmax).clamp_min(EPS)
    zero = torch.round(-wmin / scale).clamp(0, scheme.qmax)
    return scale, zero


def quantize_weight(w: torch.Tensor, scheme: WeightScheme, clip: torch.Tensor | float | None = None) -> QWeight:
    scale, zero = weight_qparams(w, scheme, clip)
    return quantize_weight_with(w, scheme, scale, zero)


def quantize_weight_with(
    w: torch.Tensor, scheme: WeightScheme, scale: torch.Tensor, zero: torch.Tensor | None
) -> QWeight:
    wg = _grouped(w.float(), scheme)
    q = torch.round(wg / scale[..., None])
    if zero is not None:
        q = q + zero[..., None]
    q = q.clamp(scheme.qmin, scheme.qmax).reshape(w.shape).to(torch.int8)
    return QWeight(q=q, scale=scale.float(), zero=None if zero is None else zero.to(torch.int8))


def dequantize_weight(qw: QWeight, scheme: WeightScheme, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    qg = _grouped(qw.q.to(torch.float32), scheme)
    if qw.zero is not None:
        qg = qg - qw.zero.to(torch.float32)[..., None]
    return (qg * qw.scale[..., None]).reshape(qw.q.shape).to(dtype)


def fake_quant_weight(w: torch.Tensor, scheme: WeightScheme, clip: torch.Tensor | float | None = None) -> torch.Tensor:
    """Round-trip ``w`` through the integer grid (in float32)."""
    return dequantize_weight(quantize_weight(w, scheme, clip), scheme)


# ---------------------------------------------------------------- activations

ACT_QMAX = 127.0


def act_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """Static INT8 activation scale (dequant multiplier) from a calibrated abs-max."""
    return (torch.as_tensor(amax, dtype=torch.float32) / ACT_QMAX).clamp_min(EPS)


def fake_quant_act(x: torch.Tensor, scheme: ActScheme, static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Round-trip activations through INT8 as the scheme prescribes (float32 out)."""
    if scheme.kind == "none":
        return x
    xf = x.float()
    if scheme.kind == "static_tensor":
        if static_scale is None:
            raise SqDeployError("static activation quantization needs a calibrated scale")
        scale = static_scale
    elif scheme.kind == "dynamic_tensor":
        scale = act_scale(xf.abs().amax())
    else:  # dynamic_token
        scale = act_scale(xf.abs().amax(dim=-1, keepdim=True))
    return torch.round(xf / scale).clamp(-128, 127) * scale
