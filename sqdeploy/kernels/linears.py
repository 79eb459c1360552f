"""Linear modules that keep their weights in the low-bit format and compute with it.

Each takes a float activation (``[..., in]``, quantized here when the scheme says so)
or an already-quantized :class:`~.reference.QAct` that a fused norm or activation
kernel produced. Which module a linear becomes depends only on its scheme:

============================ =============================================================
float                        :class:`HalfLinear` (cuBLAS through ``F.linear``)
INT8 weights + INT8 acts     :class:`W8A8Linear` (INT8 tensor-core GEMM, dequant epilogue)
INT4 weights, float acts     :class:`W4A16Linear` (packed INT4, GEMV / GEMM per M)
INT8 weights, float acts     :class:`HalfLinear` on the dequantized weight (W8A16 has no
                             kernel here: same numbers as the reference, no memory saving)
============================ =============================================================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sqdeploy.core.errors import SqDeployError
from sqdeploy.kernels import ops
from sqdeploy.kernels.packing import Int4Weight, Int8Weight, int4_from_spec, int8_from_spec
from sqdeploy.kernels.reference import InputQuant, QAct, input_quant
from sqdeploy.kernels.spec import LinearSpec


class KernelLinear(nn.Module):
    """Common input handling: optional pre-quant multiplier, then the input quantization."""

    int8_activations = False

    def __init__(self, spec: LinearSpec, iq: InputQuant, device, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = spec.in_features, spec.out_features
        self.dtype = dtype
        self.out_dtype = dtype  # a row-parallel W8A8 linear emits float32 partial sums (runtime.tp.parallel)
        self.input_quant = iq if iq.scale is None else InputQuant(iq.kind, iq.scale.to(device))
        pqs = spec.pre_quant_scale
        self.register_buffer("pre_quant_scale", None if pqs is None else pqs.to(device, dtype), persistent=False)
        bias = spec.bias
        self.register_buffer("bias", None if bias is None else bias.to(device, dtype), persistent=False)

    @property
    def accepts_quantized(self) -> bool:
        """A fused producer may hand this linear INT8 input directly."""
        return self.input_quant.active and self.pre_quant_scale is None

    def forward(self, x: torch.Tensor | QAct) -> torch.Tensor:
        if isinstance(x, QAct):
            return self.compute(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.pre_quant_scale is not None:
            x2 = x2 * self.pre_quant_scale
        if self.input_quant.active:
            x2 = ops.quantize(x2, self.input_quant)
        return self.compute(x2).reshape(*lead, self.out_features)

    def compute(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())


class HalfLinear(KernelLinear):
    def __init__(self, spec: LinearSpec, device, dtype: torch.dtype):
        super().__init__(spec, InputQuant(), device, dtype)
        w = spec.dequantized() if spec.quantized else spec.weight
        self.register_buffer("weight", w.to(device, dtype).contiguous(), persistent=False)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class W8A8Linear(KernelLinear):
    int8_activations = True
    def __init__(self, spec: LinearSpec, device, dtype: torch.dtype):
        super().__init__(spec, input_quant(spec.scheme.act.kind, spec.act_scale), device, dtype)
        w = int8_from_spec(spec)
        self.register_buffer("qweight", w.q.to(device), persistent=False)
        self.register_buffer("wscale", w.scale.to(device), persistent=False)

    def compute(self, qa: QAct) -> torch.Tensor:
        return ops.int8_linear(qa, Int8Weight(self.qweight, self.wscale), self.bias, self.out_dtype)


class W4A16Linear(KernelLinear):
    def __init__(self, spec: LinearSpec, device, dtype: torch.dtype):
        super().__init__(spec, InputQuant(), device, dtype)
        w = int4_from_spec(spec, compact_scales=torch.device(device).type == "cuda").to(device)
        self.group_size = w.group_size
        self.register_buffer("packed", w.packed, persistent=False)
        self.register_buffer("scales", w.scales, persistent=False)
        self.register_buffer("zeros", w.zeros, persistent=False)

    def int4(self) -> Int4Weight:
        return Int4Weight(self.packed, self.scales, self.zeros, self.group_size, self.out_features, self.in_features)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return ops.int4_linear(x, self.int4(), self.bias)

    def forward_gated(self, gu: torch.Tensor, act: str) -> torch.Tensor:
        """This linear applied to ``act(gate) * up`` of a 2-D fused gate|up output."""
        return ops.int4_linear_act(gu, self.int4(), self.bias, act)


def build_linear(spec: LinearSpec, device, dtype: torch.dtype) -> KernelLinear:
    """The module for ``spec``'s scheme (table in the module docstring)."""
    if not spec.quantized:
        return HalfLinear(spec, device, dtype)
    ws, act = spec.scheme.weight, spec.scheme.act
    if ws.bits == 8:
        return W8A8Linear(spec, device, dtype) if act.quantized else HalfLinear(spec, device, dtype)
    if act.quantized:
        raise SqDeployError(
            f"{spec.scheme.describe()}: INT4 weights with INT8 activations have no kernel; use a W4A16 or W8A8 recipe"
        )
    return W4A16Linear(spec, device, dtype)
