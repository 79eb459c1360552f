"""The smoothed float weights of a quantized model, for re-quantizing it another way.

TensorRT-LLM has no producer-tested asymmetric INT4 (no NVIDIA tool writes zero
points for the checkpoint flow), and its weight-only W8A16/W4A16 layouts take float
weights that trtllm-build quantizes itself. Both want the weights *after smoothing
and before rounding*: a QuantizedModel records its source model and every smoothing
vector, so each layer is rebuilt from the source and the recorded vectors are folded
in exactly as the recipe folded them. Re-quantizing the already rounded asymmetric
weights instead would round twice; that is only the fallback when the source model
is gone or no longer matches.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ...families.base import ModelConfig
from ...model.checkpoint import HFCheckpoint
from ...model.loading import load_block
from .. import qmath
from ..qmodel import QuantizedModel
from ..schemes import WeightScheme
from ..smoothing import fold

# a source whose smoothed weights are this far (relative L2) from the stored quantized
# ones is not the model the directory was quantized from
MAX_REL_ERROR = {4: 0.2, 8: 0.02}


class SmoothedWeights:
    """Per layer, the canonical linears' smoothed float32 weights; ``available`` says whether the source is usable."""

    def __init__(self, qm: QuantizedModel):
        self.qm = qm
        self.cfg: ModelConfig = qm.config
        self.ck: HFCheckpoint | None = None
        self.reason = ""
        self.smoothing = qm.smoothing()
        src = (qm.manifest.get("source_model") or {}).get("path")
        if not src or not (Path(src) / "config.json").exists():
            self.reason = f"the source model {src or '(not recorded)'} is not available"
            return
        sha = hashlib.sha256((Path(src) / "config.json").read_bytes()).hexdigest()
        if sha != qm.manifest["source_model"].get("config_sha256"):
            self.reason = f"the source model at {src} has changed since quantization (config.json differs)"
            return
        self.ck = HFCheckpoint(src)
        self._check_layer0()

    @property
    def available(self) -> bool:
        return self.ck is not None

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Smoothed float32 weight of every canonical linear of layer ``i``."""
        block = load_block(self.ck, i, torch.float32)
        for group in self.qm.family.smoothing_groups:
            s = self.smoothing.get(f"layers.{i}.{group.name}")
            if s is not None:
                fold(block, group, s, self.cfg)
        return {n: block.linear(n).weight.detach() for n in self.cfg.linears}

    def _check_layer0(self) -> None:
        if self.qm.scheme.is_float:
            return
        ws = self.qm.scheme.weight
        weights = self.layer(0)
        for name, w in weights.items():
            deq = qmath.dequantize_weight(self.qm.qweight(0, name), ws)
            err = float((deq - w).norm() / w.norm().clamp_min(1e-12))
            if err > MAX_REL_ERROR[ws.bits]:
                self.reason = (
                    f"the source model's smoothed layer 0 {name} differs from the quantized one by {err:.0%}; "
                    "it is not the model this directory was quantized from"
                )
                self.ck = None
                return


def symmetric_int4(w: torch.Tensor, group: int) -> qmath.QWeight:
    """Symmetric INT4, one scale per group (s = amax / 7, q in [-8, 7]), qmath's convention."""
    return qmath.quantize_weight(w, WeightScheme(4, "group", group, symmetric=True))
