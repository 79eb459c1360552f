"""SmoothQuant+ (Pan et al. 2023) and every searched smoothing: smooth with a plan, then quantize.

A *plan* gives each smoothing group of the family its own alpha, or none (not smoothed).
The SmoothQuant+ paper uses one alpha for the whole model, found by a whole-model search;
:mod:`.smoothing_search` finds the plan (alpha, and whether to smooth each group kind) by
what the quantized model loses on held-apart calibration sequences. This module is the
main pass: every layer is smoothed with the plan, then rounded as the recipe says.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqdeploy.core.families.base import ModelConfig, SmoothGroup
from sqdeploy.core.schemes import QuantScheme
from sqdeploy.model.transformer import Block
from sqdeploy.quantize.algorithm import Algorithm, AlgorithmConfig, SearchInputs
from sqdeploy.quantize.awq import ClipSearch
from sqdeploy.quantize.rtn import Rounding
from sqdeploy.quantize.smoothing_search import SearchSettings, apply_plan, check_alpha, search_plan
from sqdeploy.quantize.streaming import LayerData, LayerResult


@dataclass(frozen=True)
class SmoothQuantPlusConfig(AlgorithmConfig):
    """``algorithm: smoothquant_plus``. alpha: ``search`` or ``auto`` (the whole-model search), a number
    for every group, null, or a plan {group: alpha or null}; ``clip``: AWQ's clipping search before rounding."""

    alpha: float | str | dict[str, float | None] | None = "search"
    grid: tuple[float, ...] | None = None  # the search's uniform alphas (default: its own grid)
    search_samples: int = 32  # at most this many sequences give the search's statistics
    search_refine: int = 2  # plans scored again with the recipe's rounding
    clip: bool = False
    search_holdout: int = SearchSettings.holdout
    search_groups: bool = SearchSettings.per_group

    def check(self, origin: str, name: str, scheme: QuantScheme) -> None:
        super().check(origin, name, scheme)
        check_alpha(origin, name, self.alpha)


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
        self.needs_quant_stream = rounding.needs_quant_stream
        self.reports_accumulated_error = True  # the manifest reports each layer's accumulated error

    def quantize_layer(self, block: Block, data: LayerData) -> LayerResult:
        scales, qweights = apply_plan(block, self.cfg, self.groups, self.alphas, self.scheme, data, self.rounding, last=True,
                                      clip=self.clip)
        return LayerResult(qweights=qweights, smoothing=scales, info={"alpha": dict(self.plan)})


def _build(config: SmoothQuantPlusConfig, scheme: QuantScheme, cfg: ModelConfig, groups: tuple[SmoothGroup, ...]):
    alpha = config.alpha
    plan = alpha if isinstance(alpha, dict) else {g.name: alpha for g in groups}
    return SmoothQuantPlus(scheme, cfg, groups, plan, rounding=Rounding.of(config), clip=ClipSearch() if config.clip else None)


def _model_search(config: SmoothQuantPlusConfig, inputs: SearchInputs):
    return search_plan(config, inputs) if config.alpha in ("search", "auto") else None


ALGORITHM = Algorithm("smoothquant_plus", SmoothQuantPlusConfig, _build, _model_search)
