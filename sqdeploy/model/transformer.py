"""One decoder-only transformer for every supported family.

The reference model is written once and configured by :class:`ModelConfig` (norm
kind, gated or plain MLP, biases, rope or learned positions), in the spirit of
gpt-fast: short, explicit, easy to quantize and to shard. It is checked against
transformers' own implementation of every family in the test suite, and it is what
calibration, evaluation, the reference readers and the GPU engine run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sqdeploy.core.families.base import ModelConfig
from sqdeploy.model.layers import ACTIVATIONS, Norm, QLinear, Rotary, apply_rotary, build_mask, sdpa


@dataclass
class Context:
    """Per-forward tensors shared by every layer: rotary cos/sin and the attention mask."""

    mask: torch.Tensor
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


class KVCache:
    """Keys (after rotary) and values per layer, [B, Hkv, T, D]."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[i] is not None:
            k = torch.cat([self.k[i], k], dim=2)
            v = torch.cat([self.v[i], v], dim=2)
        self.k[i], self.v[i] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        for name in ("q", "k", "v", "o"):
            out_f, in_f = cfg.linear_shape(name)
            setattr(self, name, QLinear(in_f, out_f, cfg.linear_has_bias(name)))
        # called with (k, v) after rotary when set: calibration of the KV-cache scale
        self.kv_observer = None

    def forward(self, x: torch.Tensor, ctx: Context, cache: KVCache | None, layer: int) -> torch.Tensor:
        b, t, _ = x.shape
        c = self.cfg
        q = self.q(x).view(b, t, c.num_heads, c.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        if ctx.cos is not None:
            q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        if self.kv_observer is not None:
            self.kv_observer(k, v)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        out = sdpa(q, k, v, ctx.mask)
        return self.o(out.transpose(1, 2).reshape(b, t, c.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.gated_mlp
        self.act = ACTIVATIONS[cfg.act]
        names = ("gate", "up", "down") if cfg.gated_mlp else ("up", "down")
        for name in names:
            out_f, in_f = cfg.linear_shape(name)
            setattr(self, name, QLinear(in_f, out_f, cfg.linear_has_bias(name)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    """Pre-norm decoder layer. Its submodules carry the canonical names (attn_norm, q, ..., down)."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.attn_norm = Norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = Norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, ctx: Context, cache: KVCache | None = None) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), ctx, cache, self.index)
        return h + self.mlp(self.mlp_norm(h))

    def linear(self, name: str) -> QLinear:
        return getattr(self.attn if name in ("q", "k", "v", "o") else self.mlp, name)

    def module(self, name: str) -> nn.Module:
        """A canonical layer-local module (norm or linear) by name."""
        return getattr(self, name) if name.endswith("norm") else self.linear(name)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed.weight.requires_grad_(False)
        self.pos_embed = None
        if cfg.position == "learned":
            self.pos_embed = nn.Embedding(cfg.max_positions + cfg.pos_offset, cfg.hidden_size)
            self.pos_embed.weight.requires_grad_(False)
        self.rotary = Rotary(cfg) if cfg.position == "rope" else None
        n = cfg.num_layers if layers is None else layers
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(n))
        self.final_norm = Norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight.requires_grad_(False)

    # The three stages below are also driven one layer at a time by the calibration loop.
    def prepare(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_length: int = 0,
    ) -> tuple[torch.Tensor, Context]:
        """Embeddings of ``input_ids`` and the per-forward context.

        ``attention_mask`` [B, past + T] marks real tokens (left padding allowed); default
        positions count real tokens only, as transformers does.
        """
        b, t = input_ids.shape
        device = input_ids.device
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -t:]
            else:
                position_ids = torch.arange(past_length, past_length + t, device=device).expand(b, t)
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids + self.cfg.pos_offset)
        q_idx = torch.arange(past_length, past_length + t, device=device).expand(b, t)
        k_idx = torch.arange(past_length + t, device=device).expand(b, past_length + t)
        ctx = Context(mask=build_mask(attention_mask, q_idx, k_idx, self.cfg.sliding_window))
        if self.rotary is not None:
            ctx.cos, ctx.sin = self.rotary(position_ids)
        return x, ctx

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(x)).float()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x, ctx = self.prepare(input_ids, position_ids, attention_mask, 0 if cache is None else cache.length)
        for block in self.layers:
            x = block(x, ctx, cache)
        return self.head(x)
