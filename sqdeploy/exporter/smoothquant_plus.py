"""SmoothQuant+ (Pan et al. 2023) for W4A16: smooth, then group-wise INT4.

One alpha for the whole model, searched on a 0.05 grid over [0, 1]. The loss of an
alpha is the whole model's quantization loss on the calibration set: every candidate
is propagated through the model with the quantization of earlier layers in effect
(one activation stream per alpha), and the relative output error of each layer
against the float model is summed over the layers, so error accumulation counts.

The search reads each layer's weights once for all alphas (layer-outer, alpha-inner),
keeping memory at one layer plus one activation stream per candidate.
"""

from __future__ import annotations

import copy
import time

import torch

from ..families.base import ModelConfig, SmoothGroup
from ..model.loading import TensorSource, load_block, load_model
from ..model.transformer import Block
from .progress import Progress
from .rtn import Rounding
from .schemes import QuantScheme
from .smoothing import smooth_block, smoothquant_scale
from .streaming import LayerData, LayerResult, StatsCollector, embed_chunks, relative_error, run_block

DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(21))  # 0.00 ... 1.00


def smooth_and_quantize(
    block: Block, cfg: ModelConfig, groups, scheme: QuantScheme, data: LayerData, alpha: float, rounding, last: bool = False
):
    scale_fn = lambda g, x, _mean, w: smoothquant_scale(x, w, alpha)  # noqa: E731
    scales, smoothed = smooth_block(block, cfg, groups, data.stats, scale_fn)
    if last:  # the main pass: no other alpha is tried on this layer's statistics
        data.release_sums(smoothed)
    return scales, rounding(block, cfg.linears, scheme, data, smoothed)


def search_alpha(
    src: TensorSource,
    ids: torch.Tensor,
    scheme: QuantScheme,
    groups: tuple[SmoothGroup, ...],
    grid: tuple[float, ...] = DEFAULT_GRID,
    device: str | torch.device = "cpu",
    batch: int = 8,
    progress: bool = True,
    rounding: Rounding = Rounding(),
    refine: int = 0,
) -> dict:
    """Whole-model loss of every alpha in ``grid``; returns the losses and the best alpha.

    Candidates are scored with the rounding of the final pass, so the search ranks the
    model that will be written. With an expensive rounding (GPTQ) and ``refine = k > 0``,
    every alpha is first scored with round-to-nearest (the paper's search) and only the
    ``k`` best are scored again with the final rounding, which picks among them: the two
    roundings rank neighbouring alphas alike, and the GPTQ passes dominate the search time.
    """
    t0 = time.perf_counter()
    two_stage = refine > 0 and rounding.method == "gptq" and len(grid) > refine
    first = _score(src, ids, scheme, groups, grid, device, batch, progress,
                   rounding.for_search() if two_stage else rounding, "SmoothQuant+ alpha search")
    out = {"grid": list(grid), "rounding": "rtn" if two_stage else rounding.method}
    if two_stage:
        finalists = tuple(sorted(sorted(grid, key=first["loss"].get)[:refine]))
        second = _score(src, ids, scheme, groups, finalists, device, batch, progress, rounding,
                        f"SmoothQuant+ refine ({rounding.method})")
        out.update(rtn=first, refined=second, finalists=list(finalists))
        first = second
    best = min(first["loss"], key=first["loss"].get)
    out.update(alpha=best, loss=first["loss"], final_output_error=first["final_output_error"],
               per_layer_error=first["per_layer_error"], seconds=time.perf_counter() - t0)
    return out


def _score(src, ids, scheme, groups, grid, device, batch, progress, rounding, title) -> dict:
    """One streaming pass: every candidate's quantized model run layer by layer on its own stream."""
    device = torch.device(device)
    cfg = src.config
    head = load_model(src, with_layers=False)
    x, ctx = embed_chunks(head, ids, batch)
    ctx.mask = ctx.mask.to(device)
    if ctx.cos is not None:
        ctx.cos, ctx.sin = ctx.cos.to(device), ctx.sin.to(device)
    streams = {a: list(x) for a in grid}
    per_layer = {a: [] for a in grid}
    with Progress(cfg.num_layers, title, progress) as bar:
        for i in range(cfg.num_layers):
            bar.update(f"layer {i + 1}/{cfg.num_layers}")
            block = load_block(src, i, torch.float32, device)
            with StatsCollector(block, cfg.linears, rounding.needs_hessian) as collector:
                y = run_block(block, x, ctx, device)
            data = LayerData(i, x, y, collector.stats, collector.kv_amax, ctx, device)
            for a in grid:
                trial = copy.deepcopy(block)
                smooth_and_quantize(trial, cfg, groups, scheme, data, a, rounding)
                streams[a] = run_block(trial, streams[a], ctx, device)
                per_layer[a].append(relative_error(streams[a], y))
            x = y
            bar.advance()
    with torch.no_grad():
        norm = head.final_norm
        ref = [norm(t) for t in x]
        final = {a: relative_error([norm(t) for t in streams[a]], ref) for a in grid}
    return {"loss": {a: sum(per_layer[a]) for a in grid}, "final_output_error": final, "per_layer_error": per_layer}


class SmoothQuantPlus:
    """The main pass: smooth every layer with the searched (or given) alpha, then quantize."""

    name = "smoothquant+"
    needs_quant_stream = True

    def __init__(
        self, scheme: QuantScheme, cfg: ModelConfig, groups: tuple[SmoothGroup, ...], alpha: float, rounding: Rounding = Rounding()
    ):
        self.scheme, self.cfg, self.groups, self.alpha, self.rounding = scheme, cfg, groups, alpha, rounding
        self.needs_hessian = rounding.needs_hessian

    def quantize_layer(self, block: Block, data: LayerData) -> LayerResult:
        scales, qweights = smooth_and_quantize(block, self.cfg, self.groups, self.scheme, data, self.alpha, self.rounding, last=True)
        return LayerResult(qweights=qweights, smoothing=scales, info={"alpha": self.alpha})
