"""Round-to-nearest: quantize a layer's linears with no smoothing and no search.

Also the last step of every other algorithm, which smooth (and clip) first and then
call :func:`quantize_block`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sqdeploy.core import qmath
from sqdeploy.core.families.base import ModelConfig
from sqdeploy.core.schemes import QuantScheme
from sqdeploy.model.transformer import Block
from sqdeploy.quantize.algorithm import Algorithm, AlgorithmConfig
from sqdeploy.quantize.gptq import ROW_PARALLEL, act_aware_sums, act_aware_target, collect_hessians, gptq_quantize, input_sharing
from sqdeploy.quantize.streaming import ChannelStats, LayerData, LayerResult


def static_scale(name: str, stats: dict[str, ChannelStats], chosen: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The static INT8 input scale of ``name``: a chosen one, or the calibrated abs-max's."""
    return chosen[name] if chosen is not None else qmath.act_scale(stats[name].absmax.amax())


def quantize_block(
    block: Block,
    names: tuple[str, ...],
    scheme: QuantScheme,
    stats: dict[str, ChannelStats],
    clip: dict[str, torch.Tensor] | None = None,
    hessians: dict[str, torch.Tensor] | None = None,
    damp: float = 0.01,
    input_scales: dict[str, torch.Tensor] | None = None,
    act_order: bool = False,
) -> dict[str, qmath.QWeight]:
    """Quantize ``names`` in place (weights become their dequantized values) and set activation schemes.

    With ``hessians`` the weights are rounded by GPTQ, otherwise to nearest. Static activation
    scales come from ``input_scales`` or the calibrated abs-max.
    """
    qweights = {}
    with torch.no_grad():
        for name in names:
            lin = block.linear(name)
            c = None if clip is None else clip.get(name)
            if hessians is not None:
                qw = gptq_quantize(lin.weight, hessians[name], scheme.weight, damp, c, act_order)
            else:
                qw = qmath.quantize_weight(lin.weight, scheme.weight, c)
            lin.weight.copy_(qmath.dequantize_weight(qw, scheme.weight, lin.weight.dtype))
            lin.act = scheme.act
            lin.input_scale = static_scale(name, stats, input_scales).to(lin.weight.device) if scheme.act.static else None
            qweights[name] = qw
    return qweights


def search_static_scales(
    block: Block, names, data: LayerData, samples: int = 8, grid: int = 20, min_ratio: float = 0.3, tokens: int = 4096
) -> dict[str, torch.Tensor]:
    """Static per-tensor activation scales that minimise the linears' output error.

    The calibrated abs-max is the safe upper bound, but a single outlier token can
    waste most of the INT8 grid; shrinking the range trades clipping of rare values
    for resolution on the rest. Each candidate ``amax * r`` is scored by
    ``|| Q(x) W^T - x W^T ||`` on the layer's real (smoothed) inputs. Linears reading the
    same input (q/k/v, gate/up) get one scale, as the fused GEMM a runtime builds of them needs.
    """
    sharing = input_sharing(names)
    inputs = data.capture(block, [g[0] for g in sharing], samples)
    scales = {}
    with torch.no_grad():
        for g in sharing:
            x = inputs[g[0]]
            x = x[:: max(1, x.shape[0] // tokens)]
            w = torch.cat([block.linear(n).weight.float() for n in g])
            ref = x @ w.t()
            amax = x.abs().amax()
            best, best_err = None, float("inf")
            for i in range(grid):
                r = 1.0 - i * (1.0 - min_ratio) / (grid - 1)
                s = qmath.act_scale(amax * r)
                err = float((torch.round(x / s).clamp(-128, 127) * s @ w.t() - ref).pow(2).sum())
                if err < best_err:
                    best, best_err = s, err
            scales.update({n: best for n in g})
    return scales


class Rounding:
    """The last step every algorithm shares: round the weights (to nearest, or GPTQ on the
    smoothed layer), then, for static activations, choose the per-tensor input scales."""

    def __init__(
        self, method: str = "rtn", damp: float = 0.01, samples: int = 128, act_scale_search: bool = False,
        act_aware: bool = False, quantized_inputs: bool = False, act_order: bool = False,
    ):
        if method not in ("rtn", "gptq"):
            from sqdeploy.core.errors import SqDeployError

            raise SqDeployError(f"rounding must be 'rtn' or 'gptq', got {method!r}")
        self.method, self.damp, self.samples = method, damp, samples
        self.act_scale_search = act_scale_search
        self.act_aware, self.quantized_inputs, self.act_order = act_aware, quantized_inputs, act_order

    @classmethod
    def of(cls, config: object) -> "Rounding":
        """The rounding a recipe's algorithm section describes (an :class:`AlgorithmConfig`; any other
        config, e.g. the float pass-through's, rounds with the defaults)."""
        c = config if isinstance(config, AlgorithmConfig) else AlgorithmConfig()
        return cls(c.rounding, c.gptq_damp, act_scale_search=c.act_scale_search, act_aware=c.gptq_act_aware,
                   quantized_inputs=c.gptq_quantized_inputs, act_order=c.gptq_act_order)

    def __call__(self, block: Block, names, scheme: QuantScheme, data: LayerData, stats, clip=None):
        """``stats`` describe the (smoothed) inputs; their ``xtx`` gives GPTQ's Hessians when collected."""
        hessians, input_scales = None, None
        if self.method == "gptq" and scheme.weight is not None and self.act_aware and scheme.act.kind != "none":
            if scheme.act.static and self.act_scale_search:  # chosen first: GPTQ then absorbs their rounding
                input_scales = search_static_scales(block, names, data)
            # per-token scales of a row-parallel linear's input are taken per rank (each rank's own
            # slice), so they are unknown until the tensor-parallel degree is: plain GPTQ there
            split = tuple(n for n in names if scheme.act.kind == "dynamic_token" and n in ROW_PARALLEL)
            hessians = self._hessians(block, split, data, stats) if split else {}
            aware = tuple(n for n in names if n not in split)
            if aware:
                hessians.update(self._act_aware(block, aware, scheme, data, stats, input_scales))
        elif self.method == "gptq" and scheme.weight is not None:
            hessians = self._hessians(block, names, data, stats)
        qweights = quantize_block(block, names, scheme, stats, clip, hessians, self.damp, input_scales, self.act_order)
        if scheme.act.static and self.act_scale_search and input_scales is None:
            for name, s in search_static_scales(block, names, data).items():
                block.linear(name).input_scale = s.to(block.linear(name).weight.device)
        return qweights

    def _hessians(self, block: Block, names, data: LayerData, stats) -> dict[str, torch.Tensor]:
        """GPTQ's Hessians of the smoothed inputs: from the calibration pass's x^T x when it kept
        them (one float32 Hessian per shared input: q/k/v, gate/up), else from one more pass."""
        if not all(stats[n].xtx is not None for n in names):
            return collect_hessians(block, names, lambda b: data.run(b, data.subset(self.samples)))
        shared: dict[int, torch.Tensor] = {}
        hessians = {}
        for n in names:
            if id(stats[n].xtx) not in shared:
                shared[id(stats[n].xtx)] = stats[n].hessian
            hessians[n] = shared[id(stats[n].xtx)]
        return hessians

    def _act_aware(
        self, block: Block, names, scheme: QuantScheme, data: LayerData, stats, input_scales=None
    ) -> dict[str, torch.Tensor]:
        """Move each weight to the least-squares target for INT8-rounded inputs; return Q(X)'s Hessians.

        The targets are the smoothed float block's outputs; the rounded inputs are the same
        inputs, or (``quantized_inputs``, when the quantized stream is propagated) the inputs
        the model with its earlier layers already quantized feeds, so GPTQ also absorbs the
        error that accumulates. Static scales are those :func:`quantize_block` will set.
        """
        def quantize(name, x):
            scale = static_scale(name, stats, input_scales).to(x.device) if scheme.act.static else None
            return qmath.fake_quant_act(x, scheme.act, scale)

        sharing = input_sharing(names)
        leads = [g[0] for g in sharing]
        floats = data.capture_chunks(block, leads, data.subset(self.samples))
        if self.quantized_inputs and data.xq is not None:
            pairs = zip(floats, data.capture_chunks(block, leads, data.subset(self.samples, quantized=True)))
        else:
            pairs = ((x, x) for x in floats)
        sums = act_aware_sums(pairs, quantize)
        tokens = sum(int(c.shape[0] * c.shape[1]) for c in data.subset(self.samples))
        hessians = {}
        with torch.no_grad():
            for g in sharing:
                cross, hq = sums[g[0]]
                h = 2.0 * hq / tokens  # one Hessian per shared input, as for plain GPTQ
                for name in g:
                    lin = block.linear(name)
                    lin.weight.copy_(act_aware_target(lin.weight, cross, hq, self.damp))
                    hessians[name] = h
        return hessians

    def for_search(self) -> "Rounding":
        """Round to nearest with abs-max activation scales: the cheap stand-in used to rank search candidates."""
        return Rounding("rtn", self.damp, self.samples)

    @property
    def needs_hessian(self) -> bool:
        """Whether the calibration pass must collect x^T x: not for act-aware GPTQ, whose own pass
        collects the sums of the rounded inputs (holding both would double the largest buffers)."""
        return self.method == "gptq" and not self.act_aware

    @property
    def needs_quant_stream(self) -> bool:
        return self.method == "gptq" and self.act_aware and self.quantized_inputs


class RTN:
    """No smoothing: round-to-nearest (or GPTQ with ``rounding: gptq``)."""

    name = "rtn"
    needs_quant_stream = False

    def __init__(self, scheme: QuantScheme, linears: tuple[str, ...], rounding: Rounding = Rounding()):
        self.scheme, self.linears, self.rounding = scheme, linears, rounding
        self.needs_hessian = rounding.needs_hessian
        self.needs_quant_stream = rounding.needs_quant_stream

    def quantize_layer(self, block: Block, data: LayerData) -> LayerResult:
        return LayerResult(qweights=self.rounding(block, self.linears, self.scheme, data, data.stats))


@dataclass(frozen=True)
class RTNConfig(AlgorithmConfig):
    """``algorithm: rtn``: only the rounding keys."""


def _build(config: RTNConfig, scheme: QuantScheme, cfg: ModelConfig, groups) -> RTN:
    return RTN(scheme, cfg.linears, Rounding.of(config))


ALGORITHM = Algorithm("rtn", RTNConfig, _build)
