"""One linear in TensorRT-LLM's semantics, and its checkpoint tensors per quant_algo.

:class:`RankLinear` is the unit every part of this package exchanges: the writer
builds one per canonical linear and rank, fuses them into TensorRT-LLM's modules and
encodes them; the reader decodes a module back and splits it into canonical linears;
the multi-GPU engine consumes them directly. Its meaning is exactly TensorRT-LLM's:

    y = act_quant(x * pre_quant_scale) @ dequant(q, scale, zero)^T (+ bias)

with ``dequant = q * scale (+ zero)`` broadcast per output channel or per group of
``in / scale.shape[1]`` input columns, and ``act_quant`` the static per-tensor
(``act_scale``) or dynamic per-token INT8 round trip of ``scheme.act``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from sqdeploy.core import qmath
from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.schemes import ActScheme, QuantScheme, WeightScheme
from sqdeploy.formats.trtllm.config import QuantSpec
from sqdeploy.formats.trtllm.pack import pack_int4_rows, unpack_int4_rows

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class RankLinear:
    parallel: str  # "column" | "row"
    scheme: QuantScheme  # weight scheme (None = float) + activation scheme
    weight: torch.Tensor | None = None  # float32 [out, in] for unquantized linears
    q: torch.Tensor | None = None  # int8 [out, in]: int8 values, or int4 values in [-8, 7]
    scale: torch.Tensor | None = None  # float32 [out] per channel, or [out, in / group] per group
    zero: torch.Tensor | None = None  # float32 [out, in / group], additive: w = q * scale + zero (experimental)
    act_scale: torch.Tensor | None = None  # float32 scalar: static per-tensor activation scale (dequant multiplier)
    pre_quant_scale: torch.Tensor | None = None  # float32 [in], multiplies x before the GEMM
    bias: torch.Tensor | None = None  # float32 [out]; row-parallel: the full bias, added once after the all-reduce

    @property
    def out_features(self) -> int:
        return (self.weight if self.q is None else self.q).shape[0]

    @property
    def in_features(self) -> int:
        return (self.weight if self.q is None else self.q).shape[1]

    def dequantized(self) -> torch.Tensor:
        """The float32 weight the GEMM effectively uses."""
        if self.q is None:
            return self.weight.float()
        s = self.scale.float()
        if s.dim() == 1:
            return self.q.float() * s[:, None]
        groups = s.shape[1]
        qg = self.q.float().view(self.q.shape[0], groups, -1)
        w = qg * s[..., None]
        if self.zero is not None:
            w = w + self.zero.float()[..., None]
        return w.reshape(self.q.shape)


def trtllm_weight_only(w: torch.Tensor, bits: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """trtllm-build's own quantization of a float weight (``symmetric_quantize`` in its
    cutlass preprocessors): per output channel, scale = amax / 2^(bits-1) kept in the
    model dtype, q = round-half-away(w / scale) clamped to the signed range."""
    wf = w.float()
    scale32 = wf.abs().amax(dim=1) / float(1 << (bits - 1))
    lim = (1 << (bits - 1)) - 1
    safe = torch.where(scale32 == 0, torch.ones_like(scale32), scale32)
    x = wf / safe[:, None]
    q = torch.sign(x) * torch.floor(x.abs() + 0.5)  # C round(): half away from zero
    q = torch.where(scale32[:, None] == 0, torch.zeros_like(q), q).clamp(-lim - 1, lim).to(torch.int8)
    return q, scale32.to(scale_dtype).float()


def _act(quant: QuantSpec) -> ActScheme:
    if quant.algo == "W8A8_SQ_PER_CHANNEL":
        return ActScheme("static_tensor")
    if quant.sq_plugin:
        return ActScheme("dynamic_token")
    return ActScheme()


def scheme_of(quant: QuantSpec) -> QuantScheme:
    """The sq-deploy scheme a checkpoint's linears follow."""
    algo = quant.algo
    if algo is None:
        return QuantScheme(None)
    if quant.groupwise:
        return QuantScheme(WeightScheme(4, "group", quant.group_size, symmetric=not quant.has_zero_point))
    bits = 4 if algo == "W4A16" else 8
    return QuantScheme(WeightScheme(bits, "channel"), _act(quant))


def encode(lin: RankLinear, quant: QuantSpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (by suffix) of one module on one rank."""
    algo, out = quant.algo, {}
    if algo is None or quant.weight_only:
        out["weight"] = lin.dequantized().to(dtype)
    elif algo == "W8A8_SQ_PER_CHANNEL":
        out["weight"] = lin.q.contiguous()
        out["weights_scaling_factor"] = lin.scale.float().reshape(-1).contiguous()
        out["activation_scaling_factor"] = lin.act_scale.float().reshape(1)
        out["prequant_scaling_factor"] = _pqs(lin).to(dtype)
    elif quant.sq_plugin:
        out["weight"] = lin.q.contiguous()
        out["per_channel_scale"] = lin.scale.float().reshape(1, -1).contiguous()
        if lin.parallel == "row":  # the runtime divides the input by the smoother
            out["smoother"] = (1.0 / _pqs(lin)).float().reshape(1, -1).contiguous()
    elif quant.groupwise:
        out["weight"] = pack_int4_rows(lin.q)
        out["weights_scaling_factor"] = lin.scale.float().contiguous()
        if quant.pre_quant_scale:
            out["prequant_scaling_factor"] = _pqs(lin).to(dtype)
        if quant.has_zero_point:  # engine layout [in / group, out]: trtllm-build does not transpose it
            out["zero"] = lin.zero.float().t().contiguous().to(dtype)
    else:
        raise SqDeployError(f"quant_algo {algo} cannot be written")
    if lin.bias is not None:
        out["bias"] = lin.bias.to(dtype)
    return out


def _pqs(lin: RankLinear) -> torch.Tensor:
    return torch.ones(lin.in_features) if lin.pre_quant_scale is None else lin.pre_quant_scale.float()


def decode(t: dict[str, torch.Tensor], quant: QuantSpec, parallel: str, dtype: torch.dtype) -> RankLinear:
    """Inverse of :func:`encode`: a module's tensors (by suffix) on one rank."""
    algo = quant.algo
    scheme = scheme_of(quant)
    bias = t["bias"].float() if "bias" in t else None
    lin = RankLinear(parallel, scheme, bias=bias)
    if algo is None:
        return replace(lin, weight=t["weight"].float())
    if quant.weight_only:
        q, scale = trtllm_weight_only(t["weight"], scheme.weight.bits, dtype)
        return replace(lin, q=q, scale=scale)
    if algo == "W8A8_SQ_PER_CHANNEL":
        return replace(
            lin, q=t["weight"], scale=t["weights_scaling_factor"].float(),
            act_scale=t["activation_scaling_factor"].float().reshape(()),
            pre_quant_scale=t["prequant_scaling_factor"].float(),
        )
    if quant.sq_plugin:
        pqs = 1.0 / t["smoother"].float().reshape(-1) if "smoother" in t else None
        return replace(lin, q=t["weight"], scale=t["per_channel_scale"].float().reshape(-1), pre_quant_scale=pqs)
    q = unpack_int4_rows(t["weight"])
    zero = t["zero"].float().t().contiguous() if "zero" in t else None
    pqs = t["prequant_scaling_factor"].float().reshape(-1) if "prequant_scaling_factor" in t else None
    return replace(lin, q=q, scale=t["weights_scaling_factor"].float(), zero=zero, pre_quant_scale=pqs)


def from_qweight(qw: qmath.QWeight, ws: WeightScheme, parallel: str, scheme: QuantScheme) -> RankLinear:
    """A QuantizedModel weight in TensorRT-LLM's symmetric convention (per-tensor scales broadcast)."""
    if not ws.symmetric:
        raise SqDeployError("asymmetric weights need re-quantization or the zero-point form first")
    scale = qw.scale.float()
    if ws.granularity == "tensor":
        scale = scale.reshape(1).expand(qw.q.shape[0]).contiguous()
    elif ws.granularity == "channel":
        scale = scale.reshape(-1)
    return RankLinear(parallel, scheme, q=qw.q, scale=scale)
