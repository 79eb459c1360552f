"""The reference decoder rearranged for the kernels: fused projections, fused norms, a static cache.

:class:`KernelTransformer` is a :class:`~sqdeploy.model.transformer.Transformer` (same
``forward`` signature, same float32 logits) whose decoder layers run

    add+norm(+quant) -> qkv GEMM -> rotary+cache write -> SDPA -> o GEMM
    add+norm(+quant) -> gate|up GEMM -> act*mul(+quant) -> down GEMM

The residual add of each sub-layer is carried into the next norm kernel, q/k/v and
gate/up each become one GEMM when their inputs are quantized alike, and INT8
activations come straight out of the norm or activation kernel. With a
:class:`StaticKVCache` the whole decode step is free of host synchronisation, so it
can be captured in a CUDA graph (:mod:`.decode`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sqdeploy.core.errors import SqDeployError
from sqdeploy.kernels import ops
from sqdeploy.kernels.linears import KernelLinear, W4A16Linear
from sqdeploy.kernels.reference import InputQuant
from sqdeploy.model.transformer import Context, KVCache, Transformer


@dataclass
class KernelContext(Context):
    causal: bool = False  # mask is None: plain causal attention (no past), else attend to every key
    length: torch.Tensor | None = None  # static cache: valid positions after this step (on the device)


class StaticKVCache:
    """Preallocated keys/values ``[B, Hkv, max_len, D]`` per layer; ``pos`` lives on the device."""

    def __init__(self, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (batch, num_kv_heads, max_len, head_dim)
        # zeros, not empty: masked positions still enter SDPA's weighted sum (with weight 0; NaN * 0 = NaN)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.length = 0  # host-side mirror of pos (eager use only; graph replays do not update it)
        self.batch, self.max_len = batch, max_len

    def reset(self) -> None:
        self.pos.zero_()
        self.length = 0

    def advance(self, t: int) -> None:
        self.pos.add_(t)
        self.length += t


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as 0 / -inf in the activation dtype, made once per forward
    (SDPA would otherwise convert the boolean mask again in every layer)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def attention(q, k, v, ctx: KernelContext) -> torch.Tensor:
    rep = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    if rep > 1 and not q.is_cuda:  # the CPU kernels of some versions lack enable_gqa with masks
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        rep = 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.causal and ctx.mask is None,
                                          scale=scale, enable_gqa=rep > 1)


class KernelAttention(nn.Module):
    def __init__(self, cfg, qkv: KernelLinear | list[KernelLinear], o: nn.Module, heads: int, kv_heads: int):
        super().__init__()
        self.cfg = cfg
        self.fused = not isinstance(qkv, list)
        self.qkv = qkv if self.fused else nn.ModuleList(qkv)
        self.o = o
        self.heads, self.kv_heads = heads, kv_heads  # this rank's heads under tensor parallelism

    def input_quant(self) -> InputQuant:
        first = self.qkv if self.fused else self.qkv[0]
        return first.input_quant if self.fused and first.accepts_quantized else InputQuant()

    def forward(self, x_in, b: int, t: int, ctx: KernelContext, cache, layer: int) -> torch.Tensor:
        d, h, hkv = self.cfg.head_dim, self.heads, self.kv_heads
        qkv = self.qkv(x_in) if self.fused else torch.cat([lin(x_in) for lin in self.qkv], dim=-1)
        qkv = qkv.view(b, t, (h + 2 * hkv) * d)
        if isinstance(cache, StaticKVCache):
            q = ops.rope_cache(qkv, ctx.cos, ctx.sin, cache.k[layer], cache.v[layer], cache.pos, h, hkv, d)
            if t == 1 and not ctx.causal:
                out = ops.decode_attention(q.reshape(b, h, d), cache.k[layer], cache.v[layer], ctx.length,
                                           self.cfg.sliding_window)
                if out is not None:
                    return self.o(out.reshape(b, h * d))
            q = q.transpose(1, 2)
            k, v = cache.k[layer], cache.v[layer]
            if ctx.causal:  # prefill from position 0: only the fresh keys
                k, v = k[:, :, :t], v[:, :, :t]
        else:
            q, k, v = ops.rope_qkv(qkv, ctx.cos, ctx.sin, h, hkv, d)
            q = q.transpose(1, 2)
            if cache is not None:
                k, v = cache.update(layer, k, v)
        out = attention(q, k, v, ctx)
        return self.o(out.transpose(1, 2).reshape(b * t, h * d))


class KernelMLP(nn.Module):
    def __init__(self, cfg, up: KernelLinear | list[KernelLinear], down: nn.Module, gated: bool):
        super().__init__()
        self.act, self.gated = cfg.act, gated
        self.fused = not isinstance(up, list)
        self.up = up if self.fused else nn.ModuleList(up)
        self.down = down

    def input_quant(self) -> InputQuant:
        return self.up.input_quant if self.fused and self.up.accepts_quantized else InputQuant()

    def forward(self, x_in) -> torch.Tensor:
        h = self.up(x_in) if self.fused else torch.cat([lin(x_in) for lin in self.up], dim=-1)
        down = self.down
        if self.gated and isinstance(down, W4A16Linear) and down.pre_quant_scale is None and h.shape[0] == 1:
            return down.forward_gated(h, self.act)  # decode: act*mul inside the GEMV
        lin = getattr(down, "linear", down)  # row-parallel wrappers keep the module as .linear
        iq = lin.input_quant if lin.accepts_quantized else InputQuant()
        return down(ops.act_mul(h, self.act, self.gated, iq))


class KernelBlock(nn.Module):
    """A decoder layer on 2-D ``[B*T, hidden]`` activations that returns ``(residual, pending delta)``."""

    def __init__(self, index: int, attn_norm: nn.Module, attn: KernelAttention, mlp_norm: nn.Module, mlp: KernelMLP):
        super().__init__()
        self.index = index
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp

    def forward(self, x, pending, b: int, t: int, ctx: KernelContext, cache):
        h, a_in = ops.add_norm(x, pending, self.attn_norm, self.attn.input_quant())
        attn_out = self.attn(a_in, b, t, ctx, cache, self.index)
        h, m_in = ops.add_norm(h, attn_out, self.mlp_norm, self.mlp.input_quant())
        return h, self.mlp(m_in)


class KernelTransformer(Transformer):
    """See the module docstring. ``forward(..., last_only=True)`` computes only the last position's logits."""

    def _context(self, input_ids, position_ids, attention_mask, cache) -> tuple[torch.Tensor, KernelContext]:
        b, t = input_ids.shape
        window = self.cfg.sliding_window
        if isinstance(cache, StaticKVCache):
            if attention_mask is not None or position_ids is not None:
                raise SqDeployError("the static KV cache serves equal-length rows: pass no attention_mask/position_ids")
            if cache.length + t > cache.max_len:
                raise SqDeployError(f"static KV cache holds {cache.max_len} positions; {cache.length + t} needed")
            pos = cache.pos + torch.arange(t, device=input_ids.device)
            position_ids = pos.expand(b, t)
            fresh = cache.length == 0 and (window is None or t <= window)
            mask = None
            if not fresh:
                k_idx = torch.arange(cache.max_len, device=input_ids.device)
                allowed = k_idx[None, :] <= pos[:, None]
                if window is not None:
                    allowed &= (pos[:, None] - k_idx[None, :]) < window
                mask = additive(allowed[None, None], self.embed.weight.dtype)
            x = self.embed(input_ids)
            if self.pos_embed is not None:
                x = x + self.pos_embed(position_ids + self.cfg.pos_offset)
            ctx = KernelContext(mask=mask, causal=fresh, length=pos[-1:] + 1)
            if self.rotary is not None:  # in the activation dtype once, not in every layer
                ctx.cos, ctx.sin = (t.to(x.dtype).contiguous() for t in self.rotary(position_ids))
            return x, ctx
        past = 0 if cache is None else cache.length
        x, ctx = self.prepare(input_ids, position_ids, attention_mask, past)
        if ctx.cos is not None:
            ctx.cos, ctx.sin = ctx.cos.to(x.dtype).contiguous(), ctx.sin.to(x.dtype).contiguous()
        total = past + t
        plain = attention_mask is None and (window is None or total <= window)
        if plain and past == 0:
            return x, KernelContext(mask=None, cos=ctx.cos, sin=ctx.sin, causal=True)
        if plain and t == 1:
            return x, KernelContext(mask=None, cos=ctx.cos, sin=ctx.sin, causal=False)
        return x, KernelContext(mask=additive(ctx.mask, x.dtype), cos=ctx.cos, sin=ctx.sin)

    def forward(self, input_ids, position_ids=None, attention_mask=None, cache=None, *, last_only: bool = False):
        if cache is not None and not isinstance(cache, (KVCache, StaticKVCache)):
            raise SqDeployError(f"unsupported cache type {type(cache).__name__}")
        b, t = input_ids.shape
        x, ctx = self._context(input_ids, position_ids, attention_mask, cache)
        x = x.reshape(b * t, -1)
        pending = None
        for block in self.layers:
            x, pending = block(x, pending, b, t, ctx, cache)
        if isinstance(cache, StaticKVCache):
            cache.advance(t)
        if last_only:
            x = x.view(b, t, -1)[:, -1].contiguous()
            pending = None if pending is None else pending.view(b, t, -1)[:, -1].contiguous()
            t = 1
        x, y = ops.add_norm(x, pending, self.final_norm, InputQuant())
        return self.lm_head(y).float().view(b, t, -1)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(x)).float()
