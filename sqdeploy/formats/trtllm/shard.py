"""Tensor-parallel split and merge of linears, TensorRT-LLM's way.

Column-parallel linears (qkv, fc, gate, lm_head) give each rank a block of output
rows with their per-row scales and bias; row-parallel ones (dense, proj) a block of
input columns with the matching pre-quant scales and group scales, while per-output
scales and the bias stay whole (the bias is added once, after the all-reduce).
q/k/v rows are split by heads; with fewer KV heads than ranks each KV head is
duplicated onto ``tp / num_kv_heads`` consecutive ranks, as TensorRT-LLM's
``dup_kv_weight`` does. Per-tensor activation scales are replicated.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families import ModelConfig
from sqdeploy.formats.trtllm.linear import RankLinear


def head_rows(cfg: ModelConfig, name: str, tp: int, rank: int) -> slice:
    """Rows of canonical linear ``name`` (output side) that column-parallel rank ``rank`` holds."""
    hd = cfg.head_dim
    if name == "q":
        n = cfg.num_heads // tp
        return slice(rank * n * hd, (rank + 1) * n * hd)
    if name in ("k", "v"):
        if cfg.num_kv_heads >= tp:
            n = cfg.num_kv_heads // tp
            return slice(rank * n * hd, (rank + 1) * n * hd)
        head = rank // (tp // cfg.num_kv_heads)
        return slice(head * hd, (head + 1) * hd)
    n = cfg.linear_shape(name)[0] // tp
    return slice(rank * n, (rank + 1) * n)


def take_rows(lin: RankLinear, rows: slice) -> RankLinear:
    pick = lambda t: None if t is None else t[rows].contiguous()
    return replace(lin, weight=pick(lin.weight), q=pick(lin.q), scale=pick(lin.scale), zero=pick(lin.zero), bias=pick(lin.bias))


def take_cols(lin: RankLinear, cols: slice) -> RankLinear:
    """Input columns ``cols``; group scales follow (the split must fall on group borders)."""
    grouped = lin.scale is not None and lin.scale.dim() == 2
    scale, zero = lin.scale, lin.zero
    if grouped:
        g = lin.in_features // lin.scale.shape[1]
        if cols.start % g or cols.stop % g:
            raise SqDeployError(f"a row-parallel split at column {cols.start} cuts a quantization group of {g}")
        gs = slice(cols.start // g, cols.stop // g)
        scale = scale[:, gs].contiguous()
        zero = None if zero is None else zero[:, gs].contiguous()
    pick = lambda t: None if t is None else t[:, cols].contiguous()
    pqs = None if lin.pre_quant_scale is None else lin.pre_quant_scale[cols].contiguous()
    return replace(lin, weight=pick(lin.weight), q=pick(lin.q), scale=scale, zero=zero, pre_quant_scale=pqs)


def pad_out(lin: RankLinear, rows: int) -> RankLinear:
    """Append output rows that compute exactly 0: zero weights (and bias, and additive zero),
    unit scales (TensorRT-LLM's own padding of GPTQ checkpoints uses unit scales too, so no
    scale is 0)."""
    extra = rows - lin.out_features
    if extra <= 0:
        return lin
    grow = lambda t, fill: None if t is None else torch.cat([t, torch.full((extra, *t.shape[1:]), fill, dtype=t.dtype)])  # noqa: E731
    return replace(lin, weight=grow(lin.weight, 0), q=grow(lin.q, 0), scale=grow(lin.scale, 1), zero=grow(lin.zero, 0),
                   bias=grow(lin.bias, 0))


def pad_in(lin: RankLinear, cols: int) -> RankLinear:
    """Append input columns with zero weights: whole quantization groups of unit scales and
    zero zeros, and a pre-quant scale of 1 (the padded inputs are 0 anyway)."""
    extra = cols - lin.in_features
    if extra <= 0:
        return lin
    scale, zero = lin.scale, lin.zero
    if scale is not None and scale.dim() == 2:
        g = lin.in_features // scale.shape[1]
        if extra % g:
            raise SqDeployError(f"padding {extra} input columns would cut a quantization group of {g}")
        scale = torch.cat([scale, scale.new_ones(scale.shape[0], extra // g)], 1)
        zero = None if zero is None else torch.cat([zero, zero.new_zeros(zero.shape[0], extra // g)], 1)
    grow = lambda t: None if t is None else torch.cat([t, t.new_zeros(t.shape[0], extra)], 1)  # noqa: E731
    pqs = None if lin.pre_quant_scale is None else torch.cat([lin.pre_quant_scale, lin.pre_quant_scale.new_ones(extra)])
    return replace(lin, weight=grow(lin.weight), q=grow(lin.q), scale=scale, zero=zero, pre_quant_scale=pqs)


MLP_COLUMN, MLP_ROW = ("gate", "up"), "down"


def pad_mlp(lins: dict[str, RankLinear], intermediate: int) -> dict[str, RankLinear]:
    """A layer's whole canonical linears with the MLP widened to ``intermediate``: zero
    gate/up rows appended (their activations are 0) and zero down columns (they add 0),
    as TensorRT-LLM pads the global dimension before splitting it evenly."""
    out = dict(lins)
    for name in MLP_COLUMN:
        if name in out:
            out[name] = pad_out(out[name], intermediate)
    out[MLP_ROW] = pad_in(out[MLP_ROW], intermediate)
    return out


def shard(lin: RankLinear, cfg: ModelConfig, name: str, tp: int, rank: int) -> RankLinear:
    """Rank ``rank``'s slice of the whole canonical linear ``name``."""
    if tp == 1:
        return lin
    if lin.parallel == "column":
        return take_rows(lin, head_rows(cfg, name, tp, rank))
    n = lin.in_features // tp
    return take_cols(lin, slice(rank * n, (rank + 1) * n))


def _same(values: list, what: str):
    first = values[0]
    for v in values[1:]:
        if (first is None) != (v is None) or (first is not None and not torch.equal(first, v)):
            raise SqDeployError(f"fused linears disagree on {what}; they share one input and need one")
    return first


def _cat(parts: list[RankLinear], field: str) -> torch.Tensor | None:
    values = [getattr(p, field) for p in parts]
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise SqDeployError(f"fused linears disagree on having a {field}")
    return torch.cat(values, dim=0)


def fuse(parts: list[RankLinear]) -> RankLinear:
    """Concatenate the output rows of linears that read the same input (q, k, v -> qkv)."""
    if len(parts) == 1:
        return parts[0]
    base = parts[0]
    return replace(
        base,
        weight=_cat(parts, "weight"), q=_cat(parts, "q"), scale=_cat(parts, "scale"), zero=_cat(parts, "zero"),
        bias=_cat(parts, "bias"),
        act_scale=_same([p.act_scale for p in parts], "the activation scale"),
        pre_quant_scale=_same([p.pre_quant_scale for p in parts], "the pre-quant scale"),
    )


def unfuse(lin: RankLinear, rows: list[int]) -> list[RankLinear]:
    """Split a fused module back into its members (``rows`` output rows each)."""
    out, start = [], 0
    for n in rows:
        out.append(take_rows(lin, slice(start, start + n)))
        start += n
    return out


def owners(cfg: ModelConfig, name: str, tp: int) -> list[int]:
    """Ranks whose slices of canonical linear ``name`` make up the whole (one per duplicated KV head)."""
    if name in ("k", "v") and cfg.num_kv_heads < tp:
        return [h * (tp // cfg.num_kv_heads) for h in range(cfg.num_kv_heads)]
    return list(range(tp))


def merge(parts: list[RankLinear]) -> RankLinear:
    """The whole linear from its rank slices (``owners`` order), as float weights.

    Slices are dequantized one by one: with trtllm-build's own weight-only quantization
    each rank's row-parallel slice has its own scales, which a single scale cannot hold.
    """
    if len(parts) == 1:
        p = parts[0]
        return replace(p, weight=p.dequantized(), q=None, scale=None, zero=None)
    base = parts[0]
    deq = [p.dequantized() for p in parts]
    if base.parallel == "column":
        return replace(base, weight=torch.cat(deq, 0), q=None, scale=None, zero=None, bias=_cat(parts, "bias"))
    pqs = None if base.pre_quant_scale is None else torch.cat([p.pre_quant_scale for p in parts])
    return replace(base, weight=torch.cat(deq, 1), q=None, scale=None, zero=None, pre_quant_scale=pqs)

