"""The layers a TensorRT-LLM engine computes differently from the reference model, in PyTorch:
read-back checkpoints (``reader``, ``hf_unified``) swap them in so that their logits are the
engine's arithmetic, not the quantized model's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sqdeploy.core import qmath
from sqdeploy.model.layers import QLinear
from sqdeploy.model.transformer import KVCache


class TrtLinear(QLinear):
    """A QLinear with TensorRT-LLM's input handling: a per-channel pre-quant scale
    (prequant_scaling_factor, 1 / smoother) and, for row-parallel linears with dynamic
    per-token activations, one per-token scale per rank's slice of the input (each rank
    quantizes its own columns: the scales are not all-reduced)."""

    def __init__(self, lin: QLinear, pre_quant_scale: torch.Tensor | None = None, act_chunks: int = 1):
        super().__init__(lin.in_features, lin.out_features, lin.bias is not None)
        self.weight, self.bias, self.act, self.input_scale = lin.weight, lin.bias, lin.act, lin.input_scale
        pqs = None if pre_quant_scale is None else pre_quant_scale.float().to(lin.weight.device)
        self.register_buffer("pre_quant_scale", pqs, persistent=False)
        self.act_chunks = act_chunks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale.to(x.dtype)
        if self.act.quantized and self.act_chunks > 1:
            parts = [qmath.fake_quant_act(c, self.act, self.input_scale).to(x.dtype) for c in x.chunk(self.act_chunks, dim=-1)]
            return F.linear(torch.cat(parts, dim=-1), self.weight, self.bias)
        return super().forward(x)


class Int8KVCache(KVCache):
    """Stores K (after rotary) and V in INT8 with the layer's kv_cache_scaling_factor, as the engine's cache does."""

    def __init__(self, scales: list[float]):
        super().__init__(len(scales))
        self.scales = scales

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor):
        s = self.scales[i]
        rt = lambda t: (torch.round(t.float() / s).clamp(-128, 127) * s).to(t.dtype)
        return super().update(i, rt(k), rt(v))
