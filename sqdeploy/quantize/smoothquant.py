"""SmoothQuant (Xiao et al. 2023) for W8A8.

Per layer: collect max|X| per input channel, smooth every group of the family with
``s = max|X|^a / max|W|^(1-a)``, then quantize weights per channel (or per tensor) and
activations per tensor (static, calibrated on the smoothed inputs) or per token.

``alpha: auto`` searches ``a`` on a grid for each layer, keeping the value that
minimises the layer's output error under the recipe's W8A8 scheme (the fixed-alpha
paper setting is 0.5; the right value moves with the layer's outliers). The grid also
holds "no smoothing" (reported as alpha ``null``): with per-token activations a layer
without outliers often quantizes best untouched, since smoothing moves difficulty into
the weights. Candidates are rounded to nearest (cheap); with ``search_refine = k``
the k best of them are scored again with the recipe's rounding (e.g. GPTQ), which
picks; the chosen alpha is then rounded as the recipe says.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from sqdeploy.core.families.base import ModelConfig, SmoothGroup
from sqdeploy.core.schemes import QuantScheme
from sqdeploy.model.transformer import Block
from sqdeploy.quantize.algorithm import Algorithm, AlgorithmConfig, SearchInputs
from sqdeploy.quantize.rtn import Rounding
from sqdeploy.quantize.smoothing import smooth_block, smoothquant_scale
from sqdeploy.quantize.smoothing_search import SearchSettings, check_alpha, search_plan
from sqdeploy.quantize.smoothquant_plus import SmoothQuantPlus
from sqdeploy.quantize.streaming import LayerData, LayerResult, relative_error, run_block

DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(2, 19))  # 0.10 ... 0.90


@dataclass(frozen=True)
class SmoothQuantConfig(AlgorithmConfig):
    """``algorithm: smoothquant``. alpha: a number (the paper's 0.5), null (no smoothing), a plan
    {group: alpha or null}, ``auto`` (searched per layer on ``grid``, default :data:`DEFAULT_GRID`)
    or ``search`` (the whole-model search of :mod:`.smoothing_search`, on its grid)."""

    alpha: float | str | dict[str, float | None] | None = 0.5
    grid: tuple[float, ...] | None = None
    search_samples: int = 16  # calibration sequences that score the candidates
    search_refine: int = 0  # finalists scored again with the recipe's rounding
    search_holdout: int = SearchSettings.holdout
    search_groups: bool = SearchSettings.per_group

    def check(self, origin: str, name: str, scheme: QuantScheme) -> None:
        super().check(origin, name, scheme)
        check_alpha(origin, name, self.alpha)


class SmoothQuant:
    name = "smoothquant"
    needs_quant_stream = False

    def __init__(
        self,
        scheme: QuantScheme,
        cfg: ModelConfig,
        groups: tuple[SmoothGroup, ...],
        config: SmoothQuantConfig = SmoothQuantConfig(),
    ):
        self.scheme, self.cfg, self.groups = scheme, cfg, groups
        self.alpha, self.grid, self.search_samples = config.alpha, tuple(config.grid or DEFAULT_GRID), config.search_samples
        self.search_refine = config.search_refine
        self.rounding = rounding = Rounding.of(config)
        self.needs_hessian = rounding.needs_hessian
        self.needs_quant_stream = rounding.needs_quant_stream

    def _apply(self, block: Block, data: LayerData, alpha: float | None, final: bool = False, last: bool = False):
        """Smooth with ``alpha`` (None: no smoothing) and quantize as the final weights will be
        (``last``: nothing is tried after this, so the unsmoothed sums can go)."""
        groups = self.groups if alpha is not None else ()
        scale_fn = lambda g, x, _mean, w: smoothquant_scale(x, w, alpha)  # noqa: E731
        rounding = self.rounding if final else self.rounding.for_search()
        scales, stats = smooth_block(block, self.cfg, groups, data.stats, scale_fn, with_xtx=rounding.needs_hessian)
        if last:
            data.release_sums(stats)
        return scales, rounding(block, self.cfg.linears, self.scheme, data, stats)

    def search(self, block: Block, data: LayerData) -> tuple[float | None, dict]:
        x = data.subset(self.search_samples)
        y = run_block(block, x, data.ctx, data.device)
        errors = {a: self._error(block, data, a, x, y, final=False) for a in (None, *self.grid)}
        if self.search_refine > 0 and self.rounding.method == "gptq":
            finalists = sorted(errors, key=errors.get)[: self.search_refine]
            refined = {a: self._error(block, data, a, x, y, final=True) for a in finalists}
            return min(refined, key=refined.get), {"rtn": errors, "refined": refined}
        return min(errors, key=errors.get), errors

    def _error(self, block: Block, data: LayerData, alpha, x, y, final: bool) -> float:
        trial = copy.deepcopy(block)
        self._apply(trial, data, alpha, final=final)
        return relative_error(run_block(trial, x, data.ctx, data.device), y)

    def quantize_layer(self, block: Block, data: LayerData) -> LayerResult:
        info: dict = {}
        alpha = self.alpha
        if alpha == "auto":
            alpha, errors = self.search(block, data)
            info["alpha_errors"] = errors
        alpha = None if alpha is None else float(alpha)
        scales, qweights = self._apply(block, data, alpha, final=True, last=True)
        info["alpha"] = alpha
        return LayerResult(qweights=qweights, smoothing=scales, info=info)


def _build(config: SmoothQuantConfig, scheme: QuantScheme, cfg: ModelConfig, groups: tuple[SmoothGroup, ...]):
    if isinstance(config.alpha, dict):  # a plan (given, or chosen by the whole-model search)
        return SmoothQuantPlus(scheme, cfg, groups, config.alpha, rounding=Rounding.of(config))
    return SmoothQuant(scheme, cfg, groups, config)


def _model_search(config: SmoothQuantConfig, inputs: SearchInputs):
    return search_plan(config, inputs) if config.alpha == "search" else None


ALGORITHM = Algorithm("smoothquant", SmoothQuantConfig, _build, _model_search)
