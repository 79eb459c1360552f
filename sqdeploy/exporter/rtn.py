"""Round-to-nearest: quantize a layer's linears with no smoothing and no search.

Also the last step of every other algorithm, which smooth (and clip) first and then
call :func:`quantize_block`.
"""

from __future__ import annotations

import torch

from ..model.transformer import Block
from . import qmath
from .gptq import collect_hessians, gptq_quantize
from .schemes import QuantScheme
from .streaming import ChannelStats, LayerData, LayerResult


def quantize_block(
    block: Block,
    names: tuple[str, ...],
    scheme: QuantScheme,
    stats: dict[str, ChannelStats],
    clip: dict[str, torch.Tensor] | None = None,
    hessians: dict[str, torch.Tensor] | None = None,
    damp: float = 0.01,
) -> dict[str, qmath.QWeight]:
    """Quantize ``names`` in place (weights become their dequantized values) and set activation schemes.

    With ``hessians`` the weights are rounded by GPTQ, otherwise to nearest.
    """
    qweights = {}
    with torch.no_grad():
        for name in names:
            lin = block.linear(name)
            c = None if clip is None else clip.get(name)
            if hessians is not None:
                qw = gptq_quantize(lin.weight, hessians[name], scheme.weight, damp, c)
            else:
                qw = qmath.quantize_weight(lin.weight, scheme.weight, c)
            lin.weight.copy_(qmath.dequantize_weight(qw, scheme.weight, lin.weight.dtype))
            lin.act = scheme.act
            lin.input_scale = qmath.act_scale(stats[name].absmax.amax()).to(lin.weight.device) if scheme.act.static else None
            qweights[name] = qw
    return qweights


def search_static_scales(
    block: Block, names, data: LayerData, samples: int = 8, grid: int = 20, min_ratio: float = 0.3, tokens: int = 4096
) -> dict[str, torch.Tensor]:
    """Static per-tensor activation scales that minimise each linear's output error.

    The calibrated abs-max is the safe upper bound, but a single outlier token can
    waste most of the INT8 grid; shrinking the range trades clipping of rare values
    for resolution on the rest. Each candidate ``amax * r`` is scored by
    ``|| Q(x) W^T - x W^T ||`` on the layer's real (smoothed, weight-quantized) inputs.
    """
    inputs = data.capture(block, names, samples)
    scales = {}
    with torch.no_grad():
        for name in names:
            x = inputs[name]
            x = x[:: max(1, x.shape[0] // tokens)]
            w = block.linear(name).weight.float()
            ref = x @ w.t()
            amax = x.abs().amax()
            best, best_err = None, float("inf")
            for i in range(grid):
                r = 1.0 - i * (1.0 - min_ratio) / (grid - 1)
                s = qmath.act_scale(amax * r)
                err = float((torch.round(x / s).clamp(-128, 127) * s @ w.t() - ref).pow(2).sum())
                if err < best_err:
                    best, best_err = s, err
            scales[name] = best
    return scales


class Rounding:
    """The last step every algorithm shares: round the weights (to nearest, or GPTQ on the
    smoothed layer), then, for static activations, choose the per-tensor input scales."""

    def __init__(self, method: str = "rtn", damp: float = 0.01, samples: int = 128, act_scale_search: bool = False):
        if method not in ("rtn", "gptq"):
            from ..errors import SqDeployError

            raise SqDeployError(f"rounding must be 'rtn' or 'gptq', got {method!r}")
        self.method, self.damp, self.samples = method, damp, samples
        self.act_scale_search = act_scale_search

    def __call__(self, block: Block, names, scheme: QuantScheme, data: LayerData, stats, clip=None):
        """``stats`` describe the (smoothed) inputs; their ``xtx`` gives GPTQ's Hessians when collected."""
        hessians = None
        if self.method == "gptq" and scheme.weight is not None:
            if all(stats[n].xtx is not None for n in names):
                shared: dict[int, torch.Tensor] = {}  # one float32 Hessian per shared input (q/k/v, gate/up)
                hessians = {}
                for n in names:
                    if id(stats[n].xtx) not in shared:
                        shared[id(stats[n].xtx)] = stats[n].hessian
                    hessians[n] = shared[id(stats[n].xtx)]
            else:
                hessians = collect_hessians(block, names, lambda b: data.run(b, data.subset(self.samples)))
        qweights = quantize_block(block, names, scheme, stats, clip, hessians, self.damp)
        if scheme.act.static and self.act_scale_search:
            for name, s in search_static_scales(block, names, data).items():
                block.linear(name).input_scale = s.to(block.linear(name).weight.device)
        return qweights

    def for_search(self) -> "Rounding":
        """Round to nearest with abs-max activation scales: the cheap stand-in used to rank search candidates."""
        return Rounding("rtn", self.damp, self.samples, act_scale_search=False)

    @property
    def needs_hessian(self) -> bool:
        return self.method == "gptq"


class RTN:
    """No smoothing: round-to-nearest (or GPTQ with ``rounding: gptq``)."""

    name = "rtn"
    needs_quant_stream = False

    def __init__(self, scheme: QuantScheme, linears: tuple[str, ...], rounding: Rounding = Rounding()):
        self.scheme, self.linears, self.rounding = scheme, linears, rounding
        self.needs_hessian = rounding.needs_hessian

    def quantize_layer(self, block: Block, data: LayerData) -> LayerResult:
        return LayerResult(qweights=self.rounding(block, self.linears, self.scheme, data, data.stats))
