"""SmoothQuant+ (Pan et al. 2023) and every searched smoothing: smooth with a plan, then quantize.

A *plan* gives each smoothing group of the family its own alpha, or none (not smoothed).
The SmoothQuant+ paper uses one alpha for the whole model, found by a whole-model search;
:mod:`.smoothing_search` finds the plan (alpha, and whether to smooth each group kind) by
what the quantized model loses on held-apart calibration sequences. This module is the
main pass: every layer is smoothed with the plan, then rounded as the recipe says.
"""

from __future__ import annotations

from sqdeploy.core.families.base import ModelConfig, SmoothGroup
from sqdeploy.core.schemes import QuantScheme
from sqdeploy.model.transformer import Block
from sqdeploy.quantize.awq import ClipSearch
from sqdeploy.quantize.rtn import Rounding
from sqdeploy.quantize.smoothing_search import apply_plan
from sqdeploy.quantize.streaming import LayerData, LayerResult


class SmoothQuantPlus:
    """The main pass: smooth every layer with the searched (or given) plan, then quantize."""

    name = "smoothquant+"

    def __init__(
        self, scheme: QuantScheme, cfg: ModelConfig, groups: tuple[SmoothGroup, ...],
        plan: dict[str, float | None] | float, rounding: Rounding = Rounding(), clip: ClipSearch | None = None,
    ):
        self.clip = clip
        self.scheme, self.cfg, self.groups, self.rounding = scheme, cfg, groups, rounding
        if not isinstance(plan, dict):  # one alpha for every group
            plan = {g.name: float(plan) for g in groups}
        self.plan = plan
        self.alphas = tuple(plan.get(g.name) for g in groups)
        self.needs_hessian = rounding.needs_hessian
        self.needs_quant_stream = True  # the manifest reports each layer's accumulated error

    def quantize_layer(self, block: Block, data: LayerData) -> LayerResult:
        scales, qweights = apply_plan(block, self.cfg, self.groups, self.alphas, self.scheme, data, self.rounding, last=True,
                                      clip=self.clip)
        return LayerResult(qweights=qweights, smoothing=scales, info={"alpha": dict(self.plan)})
