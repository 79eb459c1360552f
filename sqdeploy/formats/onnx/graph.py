"""The decoder graph: embeddings, decoder layers with KV cache, final norm and LM head.

One graph serves prefill and decode (dynamic batch, sequence and past axes), with
the input/output names Optimum and ONNX Runtime GenAI use. Norms run in float32 as
in the reference; in float16 graphs the residual stream, the linears and the KV
cache are float16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from sqdeploy.core.families.base import ModelConfig
from sqdeploy.formats.onnx.attention import MS, AttnContext, build_context, contrib_attention, standard_attention
from sqdeploy.formats.onnx.builder import GraphBuilder, TensorStore, to_numpy
from sqdeploy.formats.onnx.options import OnnxOptions
from sqdeploy.formats.onnx.qdq import Linears
from sqdeploy.quantize.qmodel import QuantizedModel

BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"


def input_names(cfg: ModelConfig) -> list[str]:
    kv = [f"past_key_values.{i}.{kind}" for i in range(cfg.num_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *kv]


def output_names(cfg: ModelConfig) -> list[str]:
    return ["logits", *[f"present.{i}.{kind}" for i in range(cfg.num_layers) for kind in ("key", "value")]]


@dataclass
class BuiltGraph:
    model: onnx.ModelProto
    quantized_matmuls: int
    fused: list[list[str]]


class DecoderGraph:
    """Builds the graph of one QuantizedModel; :meth:`build` returns the ModelProto."""

    def __init__(self, qm: QuantizedModel, opts: OnnxOptions, store: TensorStore):
        self.qm, self.cfg, self.opts = qm, qm.config, opts
        self.b = GraphBuilder(opts.opset, store)
        self.ftype = TensorProto.FLOAT16 if opts.dtype == "float16" else TensorProto.FLOAT
        self.npt = np.float16 if opts.dtype == "float16" else np.float32
        self.linears = Linears(self.b, qm, opts)

    def _float(self, canonical: str) -> np.ndarray:
        return to_numpy(self.qm.get(canonical)).astype(np.float32)

    def build(self, metadata: dict[str, str], progress=None) -> BuiltGraph:
        cfg, b = self.cfg, self.b
        names = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                 "past_key0": "past_key_values.0.key"}
        ctx = build_context(b, cfg, names, self.ftype, self.opts.contrib)
        x = self._embed()
        h = self._norm(x, "layers.0.attn_norm")
        for i in range(cfg.num_layers):
            past = (f"past_key_values.{i}.key", f"past_key_values.{i}.value")
            a = self._attention(h, i, ctx, past)
            h, x = self._residual_norm(a, x, f"layers.{i}.mlp_norm")
            m = self._mlp(h, i)
            nxt = f"layers.{i + 1}.attn_norm" if i + 1 < cfg.num_layers else "final_norm"
            h, x = self._residual_norm(m, x, nxt)
            if progress is not None:
                progress.advance()
        self.linears.lm_head(h, self.qm.get("lm_head.weight"))
        model = b.model(self._inputs(), self._outputs(), f"{cfg.architecture}-decoder", metadata)
        return BuiltGraph(model, self.linears.matmuls, [list(g) for g in sorted(self.linears.fused)])

    # ---------------------------------------------------------------- pieces
    def _embed(self) -> str:
        b, cfg = self.b, self.cfg
        x = b.op("Gather", [b.initializer("embed.weight", self._float("embed.weight").astype(self.npt)), "input_ids"], "embed")
        if cfg.position == "learned":
            table = b.initializer("pos_embed.weight", self._float("pos_embed.weight").astype(self.npt))
            pos = b.op("Gather", [table, b.op("Add", ["position_ids", b.const(cfg.pos_offset)])], "pos_embed")
            x = b.op("Add", [x, pos], "embed_sum")
        return x

    def _norm_params(self, prefix: str) -> tuple[str, str | None]:
        b = self.b
        w = b.initializer(f"{prefix}.weight", self._float(f"{prefix}.weight"))
        bias = b.initializer(f"{prefix}.bias", self._float(f"{prefix}.bias")) if self.cfg.norm_has_bias else None
        return w, bias

    def _norm(self, x: str, prefix: str) -> str:
        """RMSNorm / LayerNorm in float32 (weights kept float32 in every graph)."""
        b, cfg = self.b, self.cfg
        w, bias = self._norm_params(prefix)
        xf = x if self.ftype == TensorProto.FLOAT else b.op("Cast", [x], to=TensorProto.FLOAT)
        if cfg.norm == "layernorm":
            y = b.op("LayerNormalization", [xf, w, bias], prefix, axis=-1, epsilon=cfg.norm_eps)
        else:  # primitives: ONNX Runtime's SimplifiedLayerNormalization sits in the ONNX domain, where onnx.checker rejects it
            ms = b.reduce("ReduceMean", b.op("Mul", [xf, xf]), [-1], hint=f"{prefix}.mean_sq")
            inv = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [ms, b.const(cfg.norm_eps, np.float32)])])])
            y = b.op("Mul", [w, b.op("Mul", [xf, inv])], prefix)
        return y if self.ftype == TensorProto.FLOAT else b.op("Cast", [y], to=self.ftype)

    def _residual_norm(self, delta: str, x: str, prefix: str) -> tuple[str, str]:
        """(norm(x + delta), x + delta); one SkipSimplifiedLayerNormalization in the contrib variant."""
        b, cfg = self.b, self.cfg
        if not self.opts.contrib or self.ftype != TensorProto.FLOAT:
            x = b.op("Add", [x, delta], f"{prefix}.residual")
            return self._norm(x, prefix), x
        w, bias = self._norm_params(prefix)
        outs = [prefix, "", "", f"{prefix}.residual"]
        if cfg.norm == "layernorm":
            y, _, _, s = b.op("SkipLayerNormalization", [delta, x, w, bias], prefix, outputs=outs, domain=MS, epsilon=cfg.norm_eps)
        else:
            y, _, _, s = b.op("SkipSimplifiedLayerNormalization", [delta, x, w], prefix, outputs=outs, domain=MS,
                              epsilon=cfg.norm_eps)
        return y, s

    def _attention(self, h: str, i: int, ctx: AttnContext, past: tuple[str, str]) -> str:
        q, k, v = self.linears(h, i, ("q", "k", "v"))
        attend = contrib_attention if self.opts.contrib else standard_attention
        out, _, _ = attend(self.b, self.cfg, ctx, q, k, v, past, i, self.ftype)
        return self.linears(out, i, ("o",))[0]

    def _mlp(self, h: str, i: int) -> str:
        b, cfg = self.b, self.cfg
        if cfg.gated_mlp:
            g, u = self.linears(h, i, ("gate", "up"))
            a = b.op("Mul", [self._act(g), u], f"layers.{i}.mlp.act")
        else:
            a = self._act(self.linears(h, i, ("up",))[0])
        return self.linears(a, i, ("down",))[0]

    def _act(self, x: str) -> str:
        b, act = self.b, self.cfg.act
        if act == "silu":
            return b.op("Mul", [x, b.op("Sigmoid", [x])], "silu")
        if act == "relu":
            return b.op("Relu", [x])
        approx = "tanh" if act in ("gelu_new", "gelu_pytorch_tanh") else "none"
        return b.op("Gelu", [x], approximate=approx)

    # ---------------------------------------------------------------- signature
    def _inputs(self) -> list:
        cfg, ft = self.cfg, self.ftype
        ins = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [BATCH, SEQ]),
               helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [BATCH, TOTAL]),
               helper.make_tensor_value_info("position_ids", TensorProto.INT64, [BATCH, SEQ])]
        for name in input_names(cfg)[3:]:
            ins.append(helper.make_tensor_value_info(name, ft, [BATCH, cfg.num_kv_heads, PAST, cfg.head_dim]))
        return ins

    def _outputs(self) -> list:
        cfg, ft = self.cfg, self.ftype
        outs = [helper.make_tensor_value_info("logits", ft, [BATCH, SEQ, cfg.vocab_size])]
        for name in output_names(cfg)[1:]:
            outs.append(helper.make_tensor_value_info(name, ft, [BATCH, cfg.num_kv_heads, TOTAL, cfg.head_dim]))
        return outs
