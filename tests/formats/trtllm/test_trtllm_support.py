"""Helpers of the TensorRT-LLM tests (no tests here): exporting, and a tensor-parallel forward pass
built only from TrtllmCheckpoint.rank_linear / rank_globals (what a multi-GPU engine sees)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from sqdeploy.core import qmath
from sqdeploy.formats.trtllm.options import TrtllmOptions
from sqdeploy.formats.trtllm.reader import TrtllmCheckpoint
from sqdeploy.formats.trtllm.writer import write
from sqdeploy.model.layers import ACTIVATIONS, Norm, Rotary, apply_rotary, build_mask, sdpa

# fixed-alpha recipes: the same smoothing and layouts as the built-in ones, without their searches
SQ_STATIC = {"name": "sq-static", "scheme": "w8a8-channel-static", "algorithm": {"name": "smoothquant", "alpha": 0.5}}
SQ_TOKEN = {"name": "sq-token", "scheme": "w8a8-channel-token", "algorithm": {"name": "smoothquant", "alpha": 0.5}}


def int4_recipe(group: int = 64, symmetric: bool = False, rounding: str = "rtn", act_order: bool = False) -> dict:
    """SmoothQuant+ INT4 with a fixed alpha (smoothing folded like the w4a16 recipes)."""
    weight = {"bits": 4, "granularity": "group", "group_size": group, "symmetric": symmetric}
    algorithm = {"name": "smoothquant_plus", "alpha": 0.5, "rounding": rounding, "gptq_act_order": act_order}
    name = f"sqplus-g{group}-{'sym' if symmetric else 'asym'}-{rounding}{'-ao' if act_order else ''}"
    return {"name": name, "scheme": {"weight": weight}, "algorithm": algorithm}


def recipe(spec):
    from sqdeploy.quantize.recipes import load_recipe, parse_recipe

    return parse_recipe(spec, origin=spec["name"]) if isinstance(spec, dict) else load_recipe(spec)


def export(qdir: Path, out: Path, tp: int = 1, **kw) -> dict:
    out.mkdir(parents=True)
    options = TrtllmOptions(tp=tp, kv_cache=kw.pop("kv_cache", None), int4_zero_point=kw.pop("zero_point", False), **kw)
    return write(qdir, out, options, progress=False)


class RankSplitTokenQuant(torch.nn.Module):
    """A row-parallel linear of the reference whose input ``tp`` ranks each quantize per token
    over their own columns, as TensorRT-LLM's per-token plugin does (written independently of
    the reader, so the two can disagree)."""

    def __init__(self, lin, tp: int):
        super().__init__()
        self.lin, self.tp = lin, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [qmath.fake_quant_act(c, self.lin.act) for c in x.chunk(self.tp, dim=-1)]
        return F.linear(torch.cat(parts, dim=-1).to(x.dtype), self.lin.weight, self.lin.bias)


def per_rank_token_reference(model, tp: int):
    """The PyTorch reference of a per-token recipe as a ``tp``-rank engine quantizes it: the o and
    down inputs (row-parallel) get one scale per token *and rank*; every other input is whole."""
    if tp == 1:
        return model
    for block in model.layers:
        if block.attn.o.act.kind != "dynamic_token":
            continue
        block.attn.o = RankSplitTokenQuant(block.attn.o, tp)
        block.mlp.down = RankSplitTokenQuant(block.mlp.down, tp)
    return model


def apply_linear(lin, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
    """TensorRT-LLM's semantics of one rank's linear: act_quant(x * pqs) @ dequant(w)^T (+ bias)."""
    if lin.pre_quant_scale is not None:
        x = x * lin.pre_quant_scale
    x = qmath.fake_quant_act(x, lin.scheme.act, lin.act_scale)
    return F.linear(x, lin.dequantized(), lin.bias if with_bias else None)


def _vocab_lookup(table: torch.Tensor, ids: torch.Tensor, rank: int) -> torch.Tensor:
    """A vocab-parallel embedding shard: rows it owns, zeros elsewhere (summed by the all-reduce)."""
    n = table.shape[0]
    local = ids - rank * n
    own = (local >= 0) & (local < n)
    return table[local.clamp(0, n - 1)] * own[..., None]


def _norm(cfg, g: dict, name: str) -> Norm:
    norm = Norm(cfg)
    norm.weight.data = g[f"{name}.weight"]
    if norm.bias is not None:
        norm.bias.data = g[f"{name}.bias"]
    return norm


def tp_forward(ck: TrtllmCheckpoint, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``ids`` [B, T] computed rank by rank, summing row-parallel partial outputs."""
    cfg, tp = ck.config, ck.tp
    g = [ck.rank_globals(r) for r in range(tp)]
    b, t = ids.shape
    pos = torch.arange(t).expand(b, t)
    if ck.spec.parallel_embedding:
        x = sum(_vocab_lookup(g[r]["embed.weight"], ids, r) for r in range(tp))
        if cfg.position == "learned":
            x = x + sum(_vocab_lookup(g[r]["pos_embed.weight"], pos, r) for r in range(tp))
    else:
        x = g[0]["embed.weight"][ids]
        if cfg.position == "learned":
            x = x + g[0]["pos_embed.weight"][pos]
    mask = build_mask(None, pos, pos, cfg.sliding_window)
    cos = sin = None
    if cfg.position == "rope":
        cos, sin = Rotary(cfg)(pos)
    hd, act = cfg.head_dim, ACTIVATIONS[cfg.act]
    for i in range(cfg.num_layers):
        h = _norm(cfg, g[0], f"layers.{i}.attn_norm")(x)
        attn = 0
        for r in range(tp):
            q, k, v = (apply_linear(ck.rank_linear(r, i, n), h) for n in ("q", "k", "v"))
            q, k, v = (z.view(b, t, -1, hd).transpose(1, 2) for z in (q, k, v))
            if cos is not None:
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            o = sdpa(q, k, v, mask).transpose(1, 2).reshape(b, t, -1)
            attn = attn + apply_linear(ck.rank_linear(r, i, "o"), o, with_bias=False)
        o_bias = ck.rank_linear(0, i, "o").bias
        x = x + attn + (0 if o_bias is None else o_bias)
        h = _norm(cfg, g[0], f"layers.{i}.mlp_norm")(x)
        mlp = 0
        for r in range(tp):
            up = apply_linear(ck.rank_linear(r, i, "up"), h)
            inner = act(apply_linear(ck.rank_linear(r, i, "gate"), h)) * up if cfg.gated_mlp else act(up)
            mlp = mlp + apply_linear(ck.rank_linear(r, i, "down"), inner, with_bias=False)
        d_bias = ck.rank_linear(0, i, "down").bias
        x = x + mlp + (0 if d_bias is None else d_bias)
    h = _norm(cfg, g[0], "final_norm")(x)
    logits = torch.cat([F.linear(h, g[r]["lm_head.weight"]) for r in range(tp)], dim=-1)
    return logits[..., : cfg.vocab_size]
