"""The linears of one decoder layer, in the form the scheme and the variant call for.

Semantics are the reference's ``QLinear``: ``fake_quant(x) @ dequant(Wq)^T + b``.

* float: MatMul with the stored (upcast) weight.
* static INT8 activations: ``QuantizeLinear -> DequantizeLinear`` with the calibrated
  per-tensor scale (int8, zero point 0) in front of a MatMul whose weight is an int8
  initializer behind a per-output-channel DequantizeLinear: TensorRT's explicit
  quantization pattern, which ONNX Runtime also fuses into integer GEMMs.
* dynamic INT8 activations (ONNX Runtime variant only): the scale is computed in the
  graph exactly as ``qmath.fake_quant_act`` does (``max(amax/127, 1e-8)``, round half
  to even, clamp) and the product runs as MatMulInteger on int8 x int8 with int32
  accumulation, rescaled by ``s_x * s_w``.
* N-bit weight-only: see :mod:`.int4`.

In the ONNX Runtime variant, linears that read the same input (q/k/v, gate/up) are
fused into one MatMul along the output axis when that is exact (same activation
scale); the TensorRT variant keeps one MatMul per linear, which TensorRT fuses itself.
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto

from sqdeploy.core import qmath
from sqdeploy.core.qmath import ACT_QMAX, EPS, QWeight
from sqdeploy.core.schemes import WeightScheme
from sqdeploy.formats.onnx.builder import GraphBuilder, to_numpy
from sqdeploy.formats.onnx.int4 import matmulnbits, qdq_weight, row_scales
from sqdeploy.formats.onnx.options import OnnxOptions
from sqdeploy.quantize.qmodel import QuantizedModel

FUSED_GROUPS = (("q", "k", "v"), ("gate", "up"))


class Linears:
    """Emits ``x @ W^T + b`` for the linears of a layer, from a QuantizedModel."""

    def __init__(self, b: GraphBuilder, qm: QuantizedModel, opts: OnnxOptions):
        self.b, self.qm, self.opts, self.cfg = b, qm, opts, qm.config
        self.scheme = qm.scheme
        self.npt = np.float16 if opts.dtype == "float16" else np.float32
        self.ftype = TensorProto.FLOAT16 if opts.dtype == "float16" else TensorProto.FLOAT
        self.fused: set[tuple[str, ...]] = set()
        self.matmuls = 0  # MatMul-like nodes emitted for the model's linears (fused groups count once)

    def __call__(self, x: str, layer: int, names: tuple[str, ...]) -> list[str]:
        if len(names) > 1 and self._can_fuse(layer, names):
            self.fused.add(names)
            sizes = [self.cfg.linear_shape(n)[0] for n in names]
            y = self._linear(x, layer, names)
            return self.b.op("Split", [y, self.b.const(sizes)], f"layers.{layer}.{''.join(names)}.split",
                             outputs=len(names), axis=-1)
        return [self._linear(x, layer, (n,)) for n in names]

    def _can_fuse(self, layer: int, names: tuple[str, ...]) -> bool:
        if not self.opts.contrib or names not in FUSED_GROUPS:
            return False
        if self.scheme.act.static:
            scales = [self.qm.input_scale(layer, n) for n in names]
            return all(torch.equal(scales[0], s) for s in scales[1:])
        return True

    # ---------------------------------------------------------------- weights
    def _bias(self, layer: int, names: tuple[str, ...]) -> np.ndarray | None:
        if not self.cfg.linear_has_bias(names[0]):
            return None
        return np.concatenate([to_numpy(self.qm.get(f"layers.{layer}.{n}.bias")).astype(np.float32) for n in names])

    def _qweight(self, layer: int, names: tuple[str, ...]) -> tuple[QWeight, WeightScheme]:
        ws = self.scheme.weight
        qws = [self.qm.qweight(layer, n) for n in names]
        if len(qws) == 1:
            return qws[0], ws
        scales, zeros = zip(*(row_scales(q, ws) for q in qws))
        merged = QWeight(q=torch.cat([q.q for q in qws]), scale=torch.from_numpy(np.concatenate(scales)),
                         zero=None if zeros[0] is None else torch.from_numpy(np.concatenate(zeros)).to(torch.int8))
        if ws.granularity == "tensor":
            ws = WeightScheme(ws.bits, "channel", None, ws.symmetric)
        return merged, ws

    # ---------------------------------------------------------------- forms
    def _linear(self, x: str, layer: int, names: tuple[str, ...]) -> str:
        b, name = self.b, f"layers.{layer}.{''.join(names)}"
        self.matmuls += 1
        bias = self._bias(layer, names)
        if self.scheme.is_float:
            w = np.concatenate([to_numpy(self.qm.get(f"layers.{layer}.{n}.weight")) for n in names]).T
            y = b.op("MatMul", [x, b.initializer(f"{name}.weight", w.astype(self.npt))], name)
            return self._add_bias(y, bias, name)
        qw, ws = self._qweight(layer, names)
        act = self.scheme.act
        if act.quantized and not act.static:
            return self._dynamic_int8(x, name, qw, ws, bias)
        if act.static:
            x = self._qdq_act(x, name, self.qm.input_scale(layer, names[0]))
        if self.opts.int4_format == "matmulnbits":
            return matmulnbits(b, x, name, qw, ws, self.npt, bias, self.opts.accuracy_level)
        y = b.op("MatMul", [x, qdq_weight(b, name, qw, ws, self.npt)], name)
        return self._add_bias(y, bias, name)

    def lm_head(self, x: str, weight: torch.Tensor) -> str:
        """The LM head: float, or (``--lm-head int8``) per-channel INT8 in the graph's weight-only form."""
        b = self.b
        if self.opts.lm_head == "float":
            return b.op("MatMul", [x, b.initializer("lm_head.weight", to_numpy(weight).T.astype(self.npt))], outputs=["logits"])
        ws = WeightScheme(8, "channel")
        qw = qmath.quantize_weight(weight.float(), ws)
        if self.opts.int4_format == "matmulnbits":
            return matmulnbits(b, x, "lm_head", qw, ws, self.npt, None, self.opts.accuracy_level, out="logits")
        return b.op("MatMul", [x, qdq_weight(b, "lm_head", qw, ws, self.npt)], outputs=["logits"])

    def _add_bias(self, y: str, bias: np.ndarray | None, name: str) -> str:
        if bias is None:
            return y
        return self.b.op("Add", [y, self.b.initializer(f"{name}.bias", bias.astype(self.npt))], f"{name}.biased")

    def _qdq_act(self, x: str, name: str, scale: torch.Tensor) -> str:
        b = self.b
        s = b.initializer(f"{name}.input_scale", np.asarray(float(scale.reshape(-1)[0]), dtype=self.npt))
        zp = b.initializer(f"{name}.input_zero_point", np.asarray(0, dtype=np.int8))
        q = b.op("QuantizeLinear", [x, s, zp], f"{name}.input_q")
        return b.op("DequantizeLinear", [q, s, zp], f"{name}.input_dq")

    def _dynamic_int8(self, x: str, name: str, qw: QWeight, ws: WeightScheme, bias: np.ndarray | None) -> str:
        """Per-token (or per-tensor) dynamic INT8 activations, integer MatMul, exact scales."""
        b = self.b
        if self.ftype != TensorProto.FLOAT:
            x = b.op("Cast", [x], to=TensorProto.FLOAT)
        absx = b.op("Abs", [x])
        if self.scheme.act.kind == "dynamic_token":
            amax = b.reduce("ReduceMax", absx, [-1], hint=f"{name}.act_amax")
        else:
            amax = b.op("ReduceMax", [absx], f"{name}.act_amax", keepdims=0)
        s = b.op("Max", [b.op("Div", [amax, b.const(ACT_QMAX, np.float32)]), b.const(EPS, np.float32)], f"{name}.act_scale")
        r = b.op("Clip", [b.op("Round", [b.op("Div", [x, s])]), b.const(-128.0, np.float32), b.const(127.0, np.float32)])
        q = b.op("Cast", [r], f"{name}.act_q", to=TensorProto.INT8)
        wq = b.initializer(f"{name}.qweight", to_numpy(qw.q).astype(np.int8).T.copy())
        acc = b.op("MatMulInteger", [q, wq], f"{name}.acc")
        s_w = row_scales(qw, ws)[0][:, 0].astype(np.float32)
        y = b.op("Mul", [b.op("Mul", [b.op("Cast", [acc], to=TensorProto.FLOAT), s]), b.initializer(f"{name}.scale", s_w)], name)
        if bias is not None:
            y = b.op("Add", [y, b.initializer(f"{name}.bias", bias.astype(np.float32))], f"{name}.biased")
        return y if self.ftype == TensorProto.FLOAT else b.op("Cast", [y], to=self.ftype)
