"""AWQ-style activation-aware scaling for weight-only INT4 (Lin et al. 2024, as in AutoAWQ).

For each smoothing group of a layer, a scale per input channel
``s = mean|X|^r / mean|W_norm|^(1-r)`` (normalised by ``sqrt(max s * min s)``) is
searched over ``r`` on a 20-point grid; a candidate is scored by the output error of
the module the group feeds (attention for q/k/v, the MLP for gate/up, o_proj and
down_proj themselves) when the consumers' weights are quantized with the scale
applied. The best scale is folded into the producer and the consumers, exactly like
SmoothQuant's. Then, per linear (q and k excepted, as their error is multiplied by
rope and softmax), the range of each weight group is shrunk on a grid to minimise the
group's output error: the clip search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sqdeploy.core import qmath
from sqdeploy.core.families.base import ModelConfig, SmoothGroup
from sqdeploy.core.schemes import QuantScheme
from sqdeploy.model.transformer import Block
from sqdeploy.quantize.algorithm import Algorithm, AlgorithmConfig
from sqdeploy.quantize.rtn import Rounding
from sqdeploy.quantize.smoothing import expand_to_consumer, fold, group_input_stats
from sqdeploy.quantize.streaming import ChannelStats, LayerData, LayerResult


def _inspect_fn(block: Block, group: SmoothGroup, data: LayerData) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module whose output scores a candidate scale of ``group``."""
    if group.kind == "norm":
        if set(group.consumers) <= {"q", "k", "v"}:
            seq = data.x[0].shape[1]
            return lambda x: block.attn(x.view(-1, seq, x.shape[-1]), data.ctx, None, block.index)
        return block.mlp
    return block.linear(group.consumers[0])


def _weight_mean(block: Block, group: SmoothGroup, scheme, cfg: ModelConfig) -> torch.Tensor:
    """AutoAWQ's w_mean: |W| normalised by its group maximum, averaged per input channel."""
    ws = []
    for c in group.consumers:
        w = block.linear(c).weight
        g = scheme.group_size if scheme.granularity == "group" else w.shape[1]
        wg = w.abs().view(w.shape[0], -1, g)
        ws.append((wg / wg.amax(dim=-1, keepdim=True).clamp_min(1e-8)).view_as(w))
    return group_input_stats(group, torch.cat(ws).mean(0), cfg)


def search_clip(w: torch.Tensor, x: torch.Tensor, ws, grid: int = 20, max_shrink: float = 0.5, tokens: int = 512) -> torch.Tensor:
    """Per (row, group) range-shrink ratio minimising the group's output error (AutoAWQ auto_clip)."""
    out_f, in_f = w.shape
    g = ws.group_size if ws.granularity == "group" else in_f
    step = max(1, x.shape[0] // tokens)
    xs = x[::step][:tokens].t().reshape(in_f // g, g, -1)  # [G, g, n]
    best_ratio = torch.ones(out_f, in_f // g, device=w.device)
    batch = 256
    for o0 in range(0, out_f, batch):
        wb = w[o0 : o0 + batch]
        wg = wb.view(wb.shape[0], in_f // g, g)  # [ob, G, g]
        ref = torch.einsum("ogk,gkn->ogn", wg, xs)
        best_err = torch.full(wg.shape[:2], float("inf"), device=w.device)
        for i in range(int(max_shrink * grid)):
            ratio = 1 - i / grid
            q = qmath.fake_quant_weight(wb, ws, clip=ratio).view_as(wg)
            err = (torch.einsum("ogk,gkn->ogn", q, xs) - ref).pow(2).mean(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio[o0 : o0 + batch][better] = ratio
    return best_ratio


@dataclass(frozen=True)
class ClipSearch:
    """AWQ's weight-clipping search over a layer's linears (by default q and k excepted: their error
    is multiplied by rope and softmax), on the inputs of the first ``samples`` calibration sequences."""

    grid: int = 20
    max_shrink: float = 0.5
    tokens: int = 512
    samples: int = 16
    skip: tuple[str, ...] = ("q", "k")

    def __call__(self, block: Block, linears, ws, data: LayerData) -> dict[str, torch.Tensor]:
        names = [n for n in linears if n not in self.skip]
        inputs = data.capture(block, names, self.samples)
        with torch.no_grad():
            return {n: search_clip(block.linear(n).weight, inputs[n], ws, self.grid, self.max_shrink, self.tokens)
                    for n in names}


@dataclass(frozen=True)
class AWQConfig(AlgorithmConfig):
    """``algorithm: awq``: the scale search's grid and inputs, and the clipping search's (``clip``)."""

    grid: int = 20  # ratios r = i / grid tried per smoothing group
    duo_scaling: bool = True  # s = mean|X|^r / mean|W|^(1-r); false: mean|X|^r
    clip: bool = True
    clip_grid: int = ClipSearch.grid
    max_shrink: float = ClipSearch.max_shrink
    search_samples: int = ClipSearch.samples
    clip_tokens: int = ClipSearch.tokens


class AWQ:
    name = "awq"
    needs_quant_stream = False

    def __init__(self, scheme: QuantScheme, cfg: ModelConfig, groups: tuple[SmoothGroup, ...], config: AWQConfig = AWQConfig()):
        self.rounding = rounding = Rounding.of(config)
        self.needs_hessian = rounding.needs_hessian
        self.scheme, self.cfg, self.groups = scheme, cfg, groups
        self.grid, self.duo_scaling, self.clip = config.grid, config.duo_scaling, config.clip
        self.clip_grid, self.max_shrink = config.clip_grid, config.max_shrink
        self.search_samples, self.clip_tokens = config.search_samples, config.clip_tokens

    # ----------------------------------------------------------- scale search
    def _search_group(self, block: Block, group: SmoothGroup, x_in: torch.Tensor, data: LayerData) -> tuple[torch.Tensor, dict]:
        cfg, ws = self.cfg, self.scheme.weight
        x_mean = group_input_stats(group, x_in.abs().mean(0), cfg)
        w_mean = _weight_mean(block, group, ws, cfg)
        inspect = _inspect_fn(block, group, data)
        originals = {c: block.linear(c).weight.detach().clone() for c in group.consumers}
        with torch.no_grad():
            ref = inspect(x_in)
            best, best_err, errors = None, float("inf"), {}
            for i in range(self.grid):
                r = i / self.grid
                if self.duo_scaling:
                    s = x_mean.pow(r) / (w_mean.pow(1 - r) + 1e-4)
                else:
                    s = x_mean.pow(r)
                s = s.clamp_min(1e-4)
                s = s / (s.max() * s.min()).sqrt()
                s_in = expand_to_consumer(group, s, cfg)
                for c, w in originals.items():
                    block.linear(c).weight.copy_(qmath.fake_quant_weight(w * s_in, ws) / s_in)
                err = float((inspect(x_in) - ref).float().pow(2).mean())
                errors[r] = err
                if err < best_err:
                    best, best_err = s.clone(), err
            for c, w in originals.items():
                block.linear(c).weight.copy_(w)
        return best, {"ratio": min(errors, key=errors.get), "errors": errors}

    def quantize_layer(self, block: Block, data: LayerData) -> LayerResult:
        cfg = self.cfg
        scales, info = {}, {"groups": {}}
        stats: dict[str, ChannelStats] = dict(data.stats)
        for group in self.groups:
            x_in = data.capture(block, [group.consumers[0]], self.search_samples)[group.consumers[0]]
            s, ginfo = self._search_group(block, group, x_in, data)
            fold(block, group, s, cfg)
            s_in = expand_to_consumer(group, s, cfg)
            for c in group.consumers:
                stats[c] = stats[c].scaled(s_in)
            scales[group.name] = s
            info["groups"][group.name] = ginfo["ratio"]
        clip = {}
        if self.clip:
            clip = ClipSearch(self.clip_grid, self.max_shrink, self.clip_tokens, self.search_samples)(
                block, cfg.linears, self.scheme.weight, data)
        qweights = self.rounding(block, cfg.linears, self.scheme, data, stats, clip)
        return LayerResult(qweights=qweights, smoothing=scales, info=info)


ALGORITHM = Algorithm("awq", AWQConfig, lambda config, scheme, cfg, groups: AWQ(scheme, cfg, groups, config))
