"""Smoothing: per-input-channel scales folded into the model.

SmoothQuant (Xiao et al., eq. 4): for the input channels ``j`` of a group of linears
that share one input ``X``,

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

and ``Y = (X diag(s)^-1) (diag(s) W)``. ``X / s`` is folded into the op that produces
``X`` (a norm's weight and bias, or the output rows of the previous linear) and ``s``
into the consumers' weight columns, so the smoothed model computes exactly the same
function at no inference cost; only the quantization error moves.

For ``v -> o`` under grouped-query attention, each V channel is read by the o_proj
columns of all query heads of its group, so a single scale per V channel is used for
all of them (computed from the maxima over the group).
"""

from __future__ import annotations

import torch

from sqdeploy.core.families.base import ModelConfig, SmoothGroup
from sqdeploy.model.transformer import Block

MIN_SCALE = 1e-5


def group_input_stats(group: SmoothGroup, stat: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Reduce a consumer-input statistic to one value per *producer* channel (GQA-aware)."""
    if group.kind != "gqa":
        return stat
    rep = cfg.num_heads // cfg.num_kv_heads
    return stat.view(cfg.num_kv_heads, rep, cfg.head_dim).amax(dim=1).reshape(-1)


def expand_to_consumer(group: SmoothGroup, s: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Producer-channel scale -> consumer input-channel scale (repeat per query head under GQA)."""
    if group.kind != "gqa":
        return s
    rep = cfg.num_heads // cfg.num_kv_heads
    return s.view(cfg.num_kv_heads, 1, cfg.head_dim).expand(-1, rep, -1).reshape(-1)


def weight_absmax(block: Block, group: SmoothGroup, cfg: ModelConfig) -> torch.Tensor:
    """max_j |W_ij| over the output rows of every consumer, per producer channel."""
    w = torch.stack([block.linear(c).weight.abs().amax(dim=0) for c in group.consumers]).amax(dim=0)
    return group_input_stats(group, w, cfg)


def smoothquant_scale(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s = max|X|^alpha / max|W|^(1-alpha); channels never seen active get s = 1."""
    x = x_absmax.float().clamp_min(MIN_SCALE)
    w = w_absmax.float().clamp_min(MIN_SCALE)
    s = (x.pow(alpha) / w.pow(1 - alpha)).clamp_min(MIN_SCALE)
    s = torch.where(x_absmax > 0, s, torch.ones_like(s))
    return s


def fold(block: Block, group: SmoothGroup, s: torch.Tensor, cfg: ModelConfig) -> None:
    """Divide the producer's output by ``s`` and multiply the consumers' input columns by ``s``."""
    s = s.to(block.linear(group.consumers[0]).weight.device, torch.float32)
    with torch.no_grad():
        producer = block.module(group.producer)
        if group.kind == "norm":
            producer.weight.div_(s.to(producer.weight.dtype))
            if producer.bias is not None:
                producer.bias.div_(s.to(producer.bias.dtype))
        else:
            producer.weight.div_(s[:, None].to(producer.weight.dtype))
            if producer.bias is not None:
                producer.bias.div_(s.to(producer.bias.dtype))
        s_in = expand_to_consumer(group, s, cfg)
        for name in group.consumers:
            w = block.linear(name).weight
            w.mul_(s_in[None, :].to(w.dtype))


def usable_groups(groups: tuple[SmoothGroup, ...], cfg: ModelConfig) -> tuple[SmoothGroup, ...]:
    """Groups that can be folded for this config (v->o needs whole heads per KV head)."""
    return tuple(g for g in groups if g.kind != "gqa" or cfg.num_heads % cfg.num_kv_heads == 0)


def smooth_block(
    block: Block,
    cfg: ModelConfig,
    groups: tuple[SmoothGroup, ...],
    stats: dict,
    scale_fn,
    with_xtx: bool = True,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Fold ``scale_fn(group, x_stat, w_absmax)`` for each group; returns the scales and the smoothed stats.

    ``stats`` maps linear name -> ChannelStats of its *unsmoothed* input; the returned
    copy describes the smoothed inputs (divided by ``s``), which is what static
    activation scales must be computed from. ``with_xtx=False`` leaves out the (large)
    ``x^T x`` sums, for trials rounded without GPTQ.
    """
    stats = dict(stats)
    scales: dict[str, torch.Tensor] = {}
    for g in groups:
        x_stat = group_input_stats(g, stats[g.consumers[0]].absmax, cfg)
        mean_stat = group_input_stats(g, stats[g.consumers[0]].absmean, cfg)
        # computed where the statistics are (the layer's device, where calibration ran)
        s = scale_fn(g, x_stat, mean_stat, weight_absmax(block, g, cfg).to(x_stat.device)).float()
        fold(block, g, s, cfg)
        s_in = expand_to_consumer(g, s, cfg)
        shared: dict[int, torch.Tensor] = {}  # consumers of one input share its scaled x^T x
        for c in g.consumers:
            src = stats[c].xtx
            stats[c] = stats[c].scaled(s_in, shared.get(id(src)), with_xtx)
            if src is not None and stats[c].xtx is not None:
                shared.setdefault(id(src), stats[c].xtx)
        scales[g.name] = s
    return scales, stats
