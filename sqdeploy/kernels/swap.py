"""Build the kernel model: from a loaded reference model, or straight from a tensor source.

``prepare_model(model, device, source)`` swaps every ``QLinear`` of the reference model
for a real low-bit module built from ``source``'s integer weights (the reference model
only holds dequantized floats). ``load_for_device(source, device)`` does the same
without materialising the float reference first, which matters for 7B-sized models.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families.base import ModelConfig
from sqdeploy.kernels.device import resolve_device
from sqdeploy.kernels.linears import KernelLinear, build_linear
from sqdeploy.kernels.model import KernelAttention, KernelBlock, KernelMLP, KernelTransformer
from sqdeploy.kernels.spec import LinearSpec, can_concat, concat, float_spec, spec_from_qweight
from sqdeploy.model.layers import Norm, Rotary
from sqdeploy.model.transformer import Transformer

RowWrap = Callable[[str, KernelLinear], nn.Module]  # (canonical name, linear) -> module (e.g. all-reduce after it)


def _quantized(source) -> bool:
    scheme = getattr(source, "scheme", None)
    return scheme is not None and not scheme.is_float


def source_specs(source, i: int) -> dict[str, LinearSpec]:
    """Specs of layer ``i``'s linears from a tensor source (a QuantizedModel gives integers)."""
    cfg: ModelConfig = source.config
    out = {}
    for name in cfg.linears:
        bias = source.get(f"layers.{i}.{name}.bias") if cfg.linear_has_bias(name) else None
        if _quantized(source):
            act_scale = source.input_scale(i, name) if source.scheme.act.static else None
            out[name] = spec_from_qweight(source.qweight(i, name), source.scheme, bias, act_scale)
        else:
            out[name] = float_spec(source.get(f"layers.{i}.{name}.weight"), bias)
    return out


def _model_specs(block, cfg: ModelConfig) -> dict[str, LinearSpec]:
    out = {}
    for name in cfg.linears:
        lin = block.linear(name)
        if lin.act.quantized:
            raise SqDeployError(
                "the model has quantized linears but no integer weights were given: "
                "pass source=QuantizedModel(dir) (the directory the model was loaded from)"
            )
        out[name] = float_spec(lin.weight.detach(), None if lin.bias is None else lin.bias.detach())
    return out


def _group(specs: list[LinearSpec], device, dtype) -> KernelLinear | list[KernelLinear]:
    if len(specs) == 1 or can_concat(specs):
        return build_linear(concat(specs) if len(specs) > 1 else specs[0], device, dtype)
    return [build_linear(s, device, dtype) for s in specs]


def build_block(cfg: ModelConfig, i: int, specs: dict[str, LinearSpec], norms: tuple[nn.Module, nn.Module],
                device, dtype, heads: int | None = None, kv_heads: int | None = None,
                wrap_row: RowWrap | None = None) -> KernelBlock:
    """One kernel layer; ``heads``/``kv_heads``/``wrap_row`` serve tensor parallelism (this rank's share)."""
    wrap = wrap_row or (lambda name, lin: lin)
    qkv = _group([specs["q"], specs["k"], specs["v"]], device, dtype)
    attn = KernelAttention(cfg, qkv, wrap("o", build_linear(specs["o"], device, dtype)),
                           heads or cfg.num_heads, kv_heads or cfg.num_kv_heads)
    up_names = ["gate", "up"] if cfg.gated_mlp else ["up"]
    up = _group([specs[n] for n in up_names], device, dtype)
    mlp = KernelMLP(cfg, up, wrap("down", build_linear(specs["down"], device, dtype)), cfg.gated_mlp)
    return KernelBlock(i, norms[0], attn, norms[1], mlp)


def make_norm(cfg: ModelConfig, weight: torch.Tensor, bias: torch.Tensor | None, device, dtype) -> Norm:
    norm = Norm(cfg)
    with torch.no_grad():
        norm.weight.copy_(weight.float())
        if norm.bias is not None:
            norm.bias.copy_(bias.float())
    return norm.to(device, dtype)


def source_norms(source, i: int, device, dtype) -> tuple[Norm, Norm]:
    cfg = source.config
    get = lambda n: source.get(f"layers.{i}.{n}") if source.has(f"layers.{i}.{n}") else None  # noqa: E731
    return tuple(make_norm(cfg, get(f"{n}.weight"), get(f"{n}.bias"), device, dtype) for n in ("attn_norm", "mlp_norm"))


def shell(cfg: ModelConfig, embed: nn.Module, pos_embed: nn.Module | None, final_norm: nn.Module,
          lm_head: nn.Module, device) -> KernelTransformer:
    """A KernelTransformer around given global modules (no layers yet).

    Built attribute by attribute rather than through ``Transformer.__init__``: that would
    allocate (and initialise) embedding tables only to throw them away, and even on the
    meta device it costs each tensor-parallel worker seconds of one-time imports.
    """
    model = KernelTransformer.__new__(KernelTransformer)
    nn.Module.__init__(model)
    model.cfg = cfg
    model.embed, model.pos_embed = embed, pos_embed
    model.rotary = Rotary(cfg).to(device) if cfg.position == "rope" else None
    model.layers = nn.ModuleList()
    model.final_norm, model.lm_head = final_norm, lm_head
    return model.eval()


def moved(m: nn.Module | None, device, dtype) -> nn.Module | None:
    """A copy of a leaf module (embedding, norm, linear) on ``device``/``dtype``; the original is left alone."""
    if m is None:
        return None
    new = copy.copy(m)
    new._parameters = {
        k: None if p is None else nn.Parameter(p.detach().to(device, dtype), requires_grad=False)
        for k, p in m._parameters.items()
    }
    new._buffers = {k: None if b is None else b.to(device) for k, b in m._buffers.items()}
    return new


def _globals_of(model: Transformer, device, dtype) -> tuple:
    return tuple(moved(m, device, dtype) for m in (model.embed, model.pos_embed, model.final_norm, model.lm_head))


@torch.no_grad()
def prepare_model(model: Transformer, device: str | torch.device = "cuda", source=None,
                  dtype: torch.dtype | None = None) -> KernelTransformer:
    """The kernel version of ``model`` on ``device``.

    ``source`` is the QuantizedModel (or any tensor source with ``qweight``) that
    ``model`` was loaded from; without it the model must be unquantized. ``dtype``
    defaults to float16 on CUDA and float32 elsewhere (where the exact PyTorch
    arithmetic of :mod:`.reference` runs).
    """
    device, dtype = resolve_device(device, dtype, source)
    cfg = model.cfg
    layers = []
    for i, block in enumerate(model.layers):
        specs = source_specs(source, i) if _quantized(source) else _model_specs(block, cfg)
        norms = (moved(block.attn_norm, device, dtype), moved(block.mlp_norm, device, dtype))
        layers.append(build_block(cfg, i, specs, norms, device, dtype))
    out = shell(cfg, *_globals_of(model, device, dtype), device)
    out.layers.extend(layers)
    return out


@torch.no_grad()
def load_for_device(source, device: str | torch.device = "cuda", dtype: torch.dtype | None = None) -> KernelTransformer:
    """The kernel model straight from a tensor source (QuantizedModel, HFCheckpoint), one layer at a time."""
    from sqdeploy.model.loading import load_model

    device, dtype = resolve_device(device, dtype, source)
    glob = load_model(source, dtype=dtype, device="cpu", with_layers=False)
    out = shell(source.config, *_globals_of(glob, device, dtype), device)
    for i in range(source.config.num_layers):
        specs = source_specs(source, i)
        out.layers.append(build_block(source.config, i, specs, source_norms(source, i, device, dtype), device, dtype))
    return out
