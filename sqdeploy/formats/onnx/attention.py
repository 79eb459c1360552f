"""Self-attention with a KV cache, in standard ONNX ops or ONNX Runtime's contrib ops.

Both forms follow the reference decoder (:mod:`sqdeploy.model.transformer`): keys are
cached after rotary embedding; a query at index ``past + t`` of the concatenated
sequence sees keys ``0..past + t`` (minus padding marked 0 in ``attention_mask``,
minus keys outside Mistral's sliding window); a query that would see nothing (a left
padding position) sees every key, as the reference does to avoid NaN. Rotary
embedding uses ``position_ids`` as given, so left-padded batches work.

The standard form never repeats KV heads: the ``H/Hkv`` query heads of one KV head
are stacked along the sequence axis, so one batched MatMul per KV head serves them.
The contrib form uses RotaryEmbedding + GroupQueryAttention; the padding/window mask
goes in as ``attention_bias`` and the kernel's own causal mask (by index in the
concatenated sequence, ``seqlens_k = total - 1`` for every row) does the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from sqdeploy.core.families.base import ModelConfig
from sqdeploy.formats.onnx.builder import GraphBuilder, to_numpy
from sqdeploy.model.layers import rope_inv_freq

MS = "com.microsoft"


@dataclass
class AttnContext:
    """Per-forward tensors every layer shares."""

    bias: str  # [B, 1, T, S] additive mask (0 / -inf) in the attention float type
    position_ids: str
    bias_rep: str | None = None  # [B, 1, rep*T, S] (standard form with GQA)
    cos: str | None = None  # [B, T, 1, D] (standard form)
    sin: str | None = None
    cos_cache: str | None = None  # [max_positions, D/2] (contrib form)
    sin_cache: str | None = None
    seqlens_k: str | None = None  # int32 [B]
    total_len: str | None = None  # int32 scalar


def build_context(b: GraphBuilder, cfg: ModelConfig, names: dict, ftype: int, contrib: bool) -> AttnContext:
    """Mask and rotary tensors from ``input_ids``, ``attention_mask``, ``position_ids`` and the past length."""
    t = b.dim(names["input_ids"], 1, "seq_len")
    # lengths come from attention_mask [B, past + T], not from the past tensors, so that the contrib form can
    # run with GroupQueryAttention's shared past/present buffers (past tensors of a fixed capacity)
    total = b.dim(names["attention_mask"], 1, "total_len")
    past = b.op("Sub", [total, t], "past_len")
    scalar = lambda x: b.op("Squeeze", [x, b.const([0])])  # noqa: E731
    q_idx = b.op("Range", [scalar(past), scalar(total), b.const(1)], "q_idx")
    k_idx = b.op("Range", [b.const(0), scalar(total), b.const(1)], "k_idx")
    q_col, k_row = b.unsqueeze(q_idx, [1]), b.unsqueeze(k_idx, [0])
    allowed = b.op("LessOrEqual", [k_row, q_col], "causal")
    if cfg.sliding_window is not None:
        inside = b.op("Less", [b.op("Sub", [q_col, k_row]), b.const(cfg.sliding_window)], "in_window")
        allowed = b.op("And", [allowed, inside])
    pad = b.unsqueeze(b.op("Cast", [names["attention_mask"]], to=TensorProto.BOOL), [1], "key_is_real")
    allowed = b.op("And", [allowed, pad], "allowed")  # [B, T, S]
    seen = b.reduce("ReduceMax", b.op("Cast", [allowed], to=TensorProto.FLOAT), [-1])
    allowed = b.op("Or", [allowed, b.op("Not", [b.op("Cast", [seen], to=TensorProto.BOOL)])], "allowed_rows")
    npt = np.float16 if ftype == TensorProto.FLOAT16 else np.float32
    bias_t = npt if contrib else np.float32  # the standard form adds the mask to float32 scores
    bias = b.op("Where", [allowed, b.const(0.0, bias_t), b.const(-np.inf, bias_t)], "mask_bias")
    ctx = AttnContext(bias=b.unsqueeze(bias, [1], "attn_bias"), position_ids=names["position_ids"])
    if contrib:
        ctx.seqlens_k = b.op("Cast", [b.op("Expand", [b.op("Sub", [total, b.const([1])]), b.dim(names["input_ids"], 0)])],
                             "seqlens_k", to=TensorProto.INT32)
        ctx.total_len = b.op("Cast", [scalar(total)], "total_seq_len", to=TensorProto.INT32)
        if cfg.position == "rope":
            ctx.cos_cache, ctx.sin_cache = _rope_tables(b, cfg, npt)
        return ctx
    rep = cfg.num_heads // cfg.num_kv_heads
    if rep > 1:
        ctx.bias_rep = b.op("Tile", [ctx.bias, b.const([1, 1, rep, 1])], "attn_bias_rep")
    if cfg.position == "rope":
        ctx.cos, ctx.sin = _rope_cos_sin(b, cfg, names["position_ids"], ftype)
    return ctx


def _rope_cos_sin(b: GraphBuilder, cfg: ModelConfig, position_ids: str, ftype: int) -> tuple[str, str]:
    """cos/sin [B, T, 1, D] computed from position_ids in float32, exactly as the reference's Rotary."""
    inv_freq, factor = rope_inv_freq(cfg)
    pos = b.unsqueeze(b.op("Cast", [position_ids], to=TensorProto.FLOAT), [-1])
    freqs = b.op("Mul", [pos, b.initializer("rope_inv_freq", to_numpy(inv_freq).astype(np.float32))], "rope_freqs")
    emb = b.op("Concat", [freqs, freqs], "rope_emb", axis=-1)
    out = []
    for fn in ("Cos", "Sin"):
        y = b.op(fn, [emb], f"rope_{fn.lower()}")
        if factor != 1.0:
            y = b.op("Mul", [y, b.const(factor, np.float32)])
        if ftype != TensorProto.FLOAT:
            y = b.op("Cast", [y], to=ftype)
        out.append(b.unsqueeze(y, [2], f"rope_{fn.lower()}_b"))
    return out[0], out[1]


def _rope_tables(b: GraphBuilder, cfg: ModelConfig, npt) -> tuple[str, str]:
    """cos/sin caches [max_positions, D/2] for ONNX Runtime's RotaryEmbedding (factor folded in)."""
    inv_freq, factor = rope_inv_freq(cfg)
    import torch

    pos = torch.arange(cfg.max_positions, dtype=torch.float32)[:, None]
    freqs = pos * inv_freq.float()
    cos = (freqs.cos() * factor).numpy().astype(npt)
    sin = (freqs.sin() * factor).numpy().astype(npt)
    return b.initializer("rope_cos_cache", cos), b.initializer("rope_sin_cache", sin)


def _rotate(b: GraphBuilder, x: str, cos: str, sin: str, d: int) -> str:
    """x [B, T, heads, D] rotated GPT-NeoX style: x*cos + rotate_half(x)*sin."""
    x1, x2 = b.op("Split", [x, b.const([d // 2, d // 2])], outputs=2, axis=-1)
    rot = b.op("Concat", [b.op("Neg", [x2]), x1], axis=-1)
    return b.op("Add", [b.op("Mul", [x, cos]), b.op("Mul", [rot, sin])])


def standard_attention(b: GraphBuilder, cfg: ModelConfig, ctx: AttnContext, q: str, k: str, v: str,
                       past: tuple[str, str], layer: int, ftype: int) -> tuple[str, str, str]:
    """Returns (attention output [B, T, H*D], present key, present value)."""
    h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    p = f"layers.{layer}.attn"
    q = b.reshape(q, [0, 0, h, d], f"{p}.q_heads")
    k = b.reshape(k, [0, 0, hkv, d], f"{p}.k_heads")
    if ctx.cos is not None:
        q, k = _rotate(b, q, ctx.cos, ctx.sin, d), _rotate(b, k, ctx.cos, ctx.sin, d)
    npt = np.float16 if ftype == TensorProto.FLOAT16 else np.float32
    q = b.op("Mul", [b.op("Transpose", [q], perm=[0, 2, 1, 3]), b.const(1.0 / math.sqrt(d), npt)], f"{p}.q_scaled")
    k = b.op("Transpose", [k], perm=[0, 2, 1, 3])
    v = b.op("Transpose", [b.reshape(v, [0, 0, hkv, d])], perm=[0, 2, 1, 3])
    present_k = b.op("Concat", [past[0], k], outputs=[f"present.{layer}.key"], axis=2)
    present_v = b.op("Concat", [past[1], v], outputs=[f"present.{layer}.value"], axis=2)
    rep = h // hkv
    if rep > 1:
        q = b.reshape(q, [0, hkv, -1, d], f"{p}.q_grouped")  # [B, Hkv, rep*T, D]
    scores = b.op("MatMul", [q, b.op("Transpose", [present_k], perm=[0, 1, 3, 2])], f"{p}.scores")
    if ftype != TensorProto.FLOAT:
        scores = b.op("Cast", [scores], to=TensorProto.FLOAT)  # softmax in float32
    bias = ctx.bias_rep if rep > 1 else ctx.bias
    probs = b.op("Softmax", [b.op("Add", [scores, bias])], f"{p}.probs", axis=-1)
    if ftype != TensorProto.FLOAT:
        probs = b.op("Cast", [probs], to=ftype)
    out = b.op("MatMul", [probs, present_v], f"{p}.context")
    if rep > 1:
        out = b.reshape(out, [0, h, -1, d])
    out = b.reshape(b.op("Transpose", [out], perm=[0, 2, 1, 3]), [0, 0, h * d], f"{p}.out")
    return out, present_k, present_v


def contrib_attention(b: GraphBuilder, cfg: ModelConfig, ctx: AttnContext, q: str, k: str, v: str,
                      past: tuple[str, str], layer: int, ftype: int) -> tuple[str, str, str]:
    """RotaryEmbedding + GroupQueryAttention (ONNX Runtime contrib ops)."""
    h, hkv = cfg.num_heads, cfg.num_kv_heads
    p = f"layers.{layer}.attn"
    if ctx.cos_cache is not None:
        q = b.op("RotaryEmbedding", [q, ctx.position_ids, ctx.cos_cache, ctx.sin_cache], f"{p}.q_rot", domain=MS,
                 num_heads=h, interleaved=0)
        k = b.op("RotaryEmbedding", [k, ctx.position_ids, ctx.cos_cache, ctx.sin_cache], f"{p}.k_rot", domain=MS,
                 num_heads=hkv, interleaved=0)
    inputs = [q, k, v, past[0], past[1], ctx.seqlens_k, ctx.total_len, "", "", "", ctx.bias]
    names = [f"{p}.out", f"present.{layer}.key", f"present.{layer}.value"]
    out, present_k, present_v = b.op("GroupQueryAttention", inputs, f"{p}.gqa", outputs=names, domain=MS,
                                     num_heads=h, kv_num_heads=hkv, scale=1.0 / math.sqrt(cfg.head_dim))
    return out, present_k, present_v
