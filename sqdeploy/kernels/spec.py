"""One linear layer as integers and scales, whatever it was read from.

A :class:`LinearSpec` is what the GPU modules are built from. It is filled from a
QuantizedModel (``qweight``/``input_scale``) or from one rank of a TensorRT-LLM
checkpoint, so the kernels never need to know where the weights came from. The
integer conventions are :mod:`sqdeploy.core.qmath`'s: symmetric ``q`` signed,
asymmetric 4-bit ``q`` and ``zero`` unsigned in [0, 15], ``w ~= (q - zero) * scale``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from sqdeploy.core import qmath
from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.schemes import QuantScheme, WeightScheme


@dataclass(frozen=True, eq=False)
class LinearSpec:
    out_features: int
    in_features: int
    scheme: QuantScheme
    weight: torch.Tensor | None = None  # float [out, in] when the scheme is float
    q: torch.Tensor | None = None  # int8 [out, in]
    scale: torch.Tensor | None = None  # float32 [out, groups]; per tensor [1, 1]
    zero: torch.Tensor | None = None  # int8 [out, groups], unsigned values (asymmetric 4-bit)
    act_scale: torch.Tensor | None = None  # static per-tensor INT8 input scale (dequant multiplier)
    pre_quant_scale: torch.Tensor | None = None  # [in] multiplier applied to the input first (AWQ/ModelOpt)
    bias: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        return not self.scheme.is_float

    def group_size(self) -> int:
        """Input channels per scale (the whole row for per-channel and per-tensor weights)."""
        ws = self.scheme.weight
        return ws.group_size if ws.granularity == "group" else self.in_features

    def dequantized(self) -> torch.Tensor:
        """The float32 weight the fake-quant reference multiplies with."""
        if not self.quantized:
            return self.weight.float()
        return qmath.dequantize_weight(qmath.QWeight(self.q, self.scale, self.zero), self.scheme.weight)

    def channel_scale(self) -> torch.Tensor:
        """Scales as [out, groups] even for per-tensor weights (so linears can be concatenated)."""
        s = self.scale.float()
        if self.scheme.weight.granularity == "tensor":
            return s.reshape(1, 1).expand(self.out_features, 1).contiguous()
        return s.reshape(self.out_features, -1)


def spec_from_qweight(
    qw: qmath.QWeight, scheme: QuantScheme, bias: torch.Tensor | None, act_scale: torch.Tensor | None = None
) -> LinearSpec:
    out_f, in_f = qw.q.shape
    return LinearSpec(out_f, in_f, scheme, q=qw.q, scale=qw.scale, zero=qw.zero, act_scale=act_scale, bias=bias)


def float_spec(weight: torch.Tensor, bias: torch.Tensor | None) -> LinearSpec:
    return LinearSpec(weight.shape[0], weight.shape[1], QuantScheme(weight=None), weight=weight, bias=bias)


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.equal(a.float().cpu(), b.float().cpu()))


def can_concat(specs: list[LinearSpec]) -> bool:
    """Linears that read the same input can run as one GEMM when everything on the input side agrees."""
    first = specs[0]
    return all(
        s.scheme == first.scheme
        and s.in_features == first.in_features
        and _same(s.act_scale, first.act_scale)
        and _same(s.pre_quant_scale, first.pre_quant_scale)
        and (s.bias is None) == (first.bias is None)
        for s in specs
    )


def concat(specs: list[LinearSpec]) -> LinearSpec:
    """Stack linears along the output dimension (q|k|v, gate|up); see :func:`can_concat`."""
    if not can_concat(specs):
        raise SqDeployError("internal: linears with different input quantization cannot share one GEMM")
    first = specs[0]
    out_f = sum(s.out_features for s in specs)
    bias = None if first.bias is None else torch.cat([s.bias for s in specs])
    if not first.quantized:
        return replace(first, out_features=out_f, weight=torch.cat([s.weight for s in specs]), bias=bias)
    ws = first.scheme.weight
    scheme = first.scheme
    if ws.granularity == "tensor":  # per-tensor scales differ per linear: keep them as per-channel
        scheme = QuantScheme(WeightScheme(ws.bits, "channel", None, ws.symmetric), first.scheme.act)
    zero = None if first.zero is None else torch.cat([s.zero for s in specs])
    return replace(
        first, out_features=out_f, scheme=scheme, q=torch.cat([s.q for s in specs]),
        scale=torch.cat([s.channel_scale() for s in specs]), zero=zero, bias=bias,
    )
