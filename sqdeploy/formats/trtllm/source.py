"""A QuantizedModel's linears in TensorRT-LLM's semantics, one whole layer at a time.

Our smoothing is folded into the norms and into v/up, so every pre-quant scale and
smoother is 1. Per quant_algo:

* float, W8A8 SmoothQuant: the stored integers and scales as they are;
* W8A16 / W4A16 (per channel): the smoothed *float* weights (trtllm-build quantizes them);
* W4A16_AWQ from an asymmetric scheme: re-quantized symmetrically from the smoothed
  float weights with the recipe's rounding (GPTQ re-run on the kept calibration set
  when the recipe rounds with GPTQ) by default, or, behind ``--int4-zero-point``, the asymmetric integers with
  TensorRT-LLM's additive zero ``(8 - z) * s`` (experimental: no NVIDIA tool produces it).

The re-quantization itself is :mod:`sqdeploy.quantize.requant`; it reads only the
quantized directory (which keeps the source weights and calibration blocks it needs).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from sqdeploy.core import qmath
from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.schemes import QuantScheme
from sqdeploy.formats.trtllm.config import QuantSpec
from sqdeploy.formats.trtllm.linear import RankLinear, from_qweight, scheme_of
from sqdeploy.quantize.qmodel import QuantizedModel
from sqdeploy.quantize.requant import SmoothedWeights, recorded_calibration, requantize_streamed, symmetric_int4


def canonical_parallel(family) -> dict[str, str]:
    """Canonical linear -> "column" / "row", from the family's TensorRT-LLM modules."""
    return {name: info.tp for info in family.trtllm.linears.values() for name in info.fuse}


class LinearSource:
    """Whole (unsplit) canonical linears of a QuantizedModel, as the target quant_algo stores them."""

    def __init__(self, qm: QuantizedModel, quant: QuantSpec, progress: bool = False, clip_search: bool = True,
                 device: str = "cpu"):
        self.qm, self.quant, self.clip_search = qm, quant, clip_search
        self.device = device
        self.cfg, self.family = qm.config, qm.family
        self.parallel = canonical_parallel(qm.family)
        self.scheme: QuantScheme = scheme_of(quant)
        self.notes: list[str] = []
        ws = qm.scheme.weight
        self.requant = quant.weight_only or (quant.groupwise and not ws.symmetric and not quant.has_zero_point)
        self.smoothed = SmoothedWeights(qm) if self.requant else None
        self.rounding = "rtn"
        self._streamed, self._next = None, 0
        if self.smoothed is not None and quant.groupwise:
            self._gptq_if_recipe_does(progress)

    def _gptq_if_recipe_does(self, progress: bool) -> None:
        """A GPTQ recipe is re-rounded with GPTQ (its kept calibration streamed again), else to nearest."""
        if self.qm.recipe.params.get("rounding", "rtn") != "gptq":
            return
        ids = recorded_calibration(self.qm)
        self._streamed = requantize_streamed(self.qm, self.smoothed.ck, ids, self.scheme, progress, self.clip_search,
                                             self.device)
        self.rounding = "gptq"

    @property
    def clipped(self) -> bool:
        """Whether the re-quantization searched clipping ranges (the GPTQ path, INT4 only)."""
        return self.clip_search and self._streamed is not None and self.quant.groupwise

    @property
    def requant_from(self) -> str | None:
        """Where re-quantized weights come from: 'smoothed float weights' or None."""
        return "smoothed float weights" if self.requant else None

    def _requantized(self, i: int) -> dict[str, qmath.QWeight]:
        """Symmetric INT4 weights of layer ``i`` (layers must be asked for in order when GPTQ streams them)."""
        if self._streamed is None:
            return {n: symmetric_int4(w, self.quant.group_size) for n, w in self._float_weights(i).items()}
        if i != self._next:
            raise SqDeployError(f"internal error: layer {i} requested out of order (expected {self._next})")
        self._next += 1
        return next(self._streamed)

    def _float_weights(self, i: int) -> dict[str, torch.Tensor]:
        if self.smoothed is not None:
            return self.smoothed.layer(i)
        return {n: self.qm.get(f"layers.{i}.{n}.weight") for n in self.cfg.linears}

    def layer(self, i: int) -> dict[str, RankLinear]:
        cfg, quant = self.cfg, self.quant
        floats = self._float_weights(i) if (quant.algo is None or (self.requant and not quant.groupwise)) else None
        requantized = self._requantized(i) if self.requant and quant.groupwise else None
        out = {}
        for name in cfg.linears:
            parallel = self.parallel[name]
            if floats is not None:
                lin = RankLinear(parallel, self.scheme, weight=floats[name])
            elif requantized is not None:
                lin = from_qweight(requantized[name], self.scheme.weight, parallel, self.scheme)
            else:
                lin = self._stored(i, name, parallel)
            bias = f"layers.{i}.{name}.bias"
            if cfg.linear_has_bias(name):
                lin = replace(lin, bias=self.qm.get(bias))
            out[name] = lin
        return self._one_act_scale_per_module(i, out)

    def _stored(self, i: int, name: str, parallel: str) -> RankLinear:
        qw, ws = self.qm.qweight(i, name), self.qm.scheme.weight
        if self.quant.has_zero_point:
            # signed q' = q - 8 with w = (q - z) * s = q' * s + (8 - z) * s
            zero = (8.0 - qw.zero.float()) * qw.scale.float()
            q = (qw.q.to(torch.int16) - 8).to(torch.int8)
            return RankLinear(parallel, self.scheme, q=q, scale=qw.scale.float(), zero=zero)
        lin = from_qweight(qw, ws, parallel, self.scheme)
        if self.scheme.act.static:
            scale = self.qm.input_scale(i, name)
            if scale is None:
                raise SqDeployError(f"{self.qm.path}: layer {i} {name} has no static activation scale; re-quantize the model")
            lin = replace(lin, act_scale=scale.float().reshape(()))
        return lin

    def _one_act_scale_per_module(self, i: int, lins: dict[str, RankLinear]) -> dict[str, RankLinear]:
        """A fused module (qkv) has one activation scale: use the members' largest (no extra clipping)."""
        if not self.scheme.act.static:
            return lins
        for module, info in self.family.trtllm.linears.items():
            scales = [lins[n].act_scale for n in info.fuse]
            if len(scales) > 1 and not all(torch.equal(scales[0], s) for s in scales[1:]):
                top = torch.stack(scales).max()
                for n in info.fuse:
                    lins[n] = replace(lins[n], act_scale=top)
                self.notes.append(f"layer {i} {module}: members had different activation scales; the largest is used")
        return lins
