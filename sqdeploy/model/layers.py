"""Building blocks of the reference decoder: norms, rotary embedding, quantizable linear."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sqdeploy.core import qmath
from sqdeploy.core.families.base import ModelConfig
from sqdeploy.core.schemes import ActScheme

ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class Norm(nn.Module):
    """RMSNorm (Llama, Qwen2, Mistral) or LayerNorm with bias (OPT), computed in float32."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(cfg.hidden_size), requires_grad=False) if cfg.norm_has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.kind == "rms":
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return (self.weight.float() * y).to(x.dtype)
        w = self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(xf, (xf.shape[-1],), w, b, self.eps).to(x.dtype)


class QLinear(nn.Module):
    """A linear whose input may be fake-quantized to INT8.

    ``weight`` holds the (already dequantized) weight, so the reference computes
    exactly ``fake_quant(x) @ dequant(Wq)^T + b``: the semantics every export target
    must reproduce. ``input_scale`` is the static per-tensor activation scale when the
    scheme has one. GPU kernels replace this module with a real low-bit one.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.act = ActScheme()
        self.register_buffer("input_scale", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act.quantized:
            x = qmath.fake_quant_act(x, self.act, self.input_scale).to(x.dtype)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, act={self.act.kind}"


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention factor, from transformers' own rope functions."""
    if cfg.rope_scaling is None:
        dim = cfg.head_dim
        return 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)).float(), 1.0
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = AutoConfig.for_model(**{k: v for k, v in cfg.hf_config.items() if k not in ("transformers_version",)})
    inv_freq, factor = ROPE_INIT_FUNCTIONS[cfg.rope_scaling["rope_type"]](hf, "cpu")
    return inv_freq.float(), float(factor)


class Rotary(nn.Module):
    """GPT-NeoX style rotary embedding (rotate halves), as Llama/Qwen2/Mistral use."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.factor = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.factor, emb.sin() * self.factor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [B, T, D]."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def build_mask(
    key_padding: torch.Tensor | None, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None
) -> torch.Tensor:
    """Boolean [B, 1, Tq, Tk] mask: causal by position, padding keys removed, optional sliding window."""
    allowed = k_pos[:, None, :] <= q_pos[:, :, None]
    if window is not None:
        allowed &= (q_pos[:, :, None] - k_pos[:, None, :]) < window
    if key_padding is not None:
        allowed &= key_padding[:, None, :].bool()
    # a fully masked row (a padded query) would give NaN; let it see itself
    allowed |= ~allowed.any(-1, keepdim=True)
    return allowed[:, None]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention with GQA (each KV head serves ``H/Hkv`` consecutive query heads)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(q.shape[-1]))
