"""What the memory planner needs to know about a model and its weight format.

A :class:`ModelShape` comes from a Hugging Face ``config.json`` (through the family
registry, so every supported family is read the same way) or from a TensorRT-LLM
checkpoint's ``config.json``. A :class:`WeightFormat` says how many bytes each
weight, scale, zero point and per-channel vector takes on the GPU; it is derived from
a TensorRT-LLM ``quantization`` section, and a recipe's scheme is first mapped to the
``quant_algo`` its TensorRT-LLM export uses, so both inputs are counted identically.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqdeploy.core.errors import SqDeployError

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
# TensorRT-LLM architecture names (checkpoint config.json) -> sq-deploy family
TRTLLM_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "LLaMAForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "QWenForCausalLM": "qwen2",
    "Qwen2ForCausalLM": "qwen2",
    "OPTForCausalLM": "opt",
}
SQ_PLUGIN_ALGOS = (
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
    "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN",
    "W8A8_SQ_PER_TENSOR_PLUGIN",
)
WEIGHT_ONLY_ALGOS = ("W8A16", "W4A16")
GROUPWISE_ALGOS = ("W4A16_AWQ", "W4A16_GPTQ")
SUPPORTED_QUANT_ALGOS = (None, "W8A8_SQ_PER_CHANNEL", *SQ_PLUGIN_ALGOS, *WEIGHT_ONLY_ALGOS, *GROUPWISE_ALGOS, "FP8")
SUPPORTED_KV_ALGOS = (None, "INT8", "FP8")


@dataclass(frozen=True)
class ModelShape:
    family: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    gated_mlp: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = False
    learned_positions: bool = False
    dtype: str = "float16"

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def num_parameters(self) -> int:
        """Parameters of the unsharded model, lm_head counted separately from the embedding."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        mlp = (3 if self.gated_mlp else 2) * h * i
        per_layer = h * (q + 2 * kv) + q * h + mlp
        per_layer += (q + 2 * kv if self.qkv_bias else 0) + (h if self.o_bias else 0)
        per_layer += ((2 * i if self.gated_mlp else i) + h) if self.mlp_bias else 0
        norms = (2 if self.norm_bias else 1) * h
        pos = self.max_positions * h if self.learned_positions else 0
        return self.layers * (per_layer + 2 * norms) + norms + 2 * self.vocab * h + pos

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], dtype: str | None = None) -> ModelShape:
        from sqdeploy.core.families import family_for_hf_config

        mc = family_for_hf_config(cfg).config_from_hf(cfg)
        return cls(
            family=mc.family, hidden=mc.hidden_size, intermediate=mc.intermediate_size, layers=mc.num_layers,
            heads=mc.num_heads, kv_heads=mc.num_kv_heads, head_dim=mc.head_dim, vocab=mc.vocab_size,
            max_positions=mc.max_positions, gated_mlp=mc.gated_mlp, qkv_bias=mc.qkv_bias, o_bias=mc.o_bias,
            mlp_bias=mc.mlp_bias, norm_bias=mc.norm_has_bias, learned_positions=mc.position == "learned",
            dtype=dtype or _deploy_dtype(mc.dtype),
        )

    @classmethod
    def from_trtllm_config(cls, cfg: Mapping[str, Any]) -> ModelShape:
        family = trtllm_family(cfg)
        h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        opt = family == "opt"
        bias = bool(cfg.get("bias", opt))
        return cls(
            family=family, hidden=h, intermediate=int(cfg.get("intermediate_size") or 4 * h),
            layers=int(cfg["num_hidden_layers"]), heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=int(cfg.get("head_size") or h // heads),
            vocab=int(cfg["vocab_size"]), max_positions=int(cfg.get("max_position_embeddings") or 2048),
            gated_mlp=not opt, qkv_bias=bias or bool(cfg.get("attn_bias", family == "qwen2")),
            o_bias=bias, mlp_bias=bias or bool(cfg.get("mlp_bias", False)), norm_bias=opt,
            learned_positions=opt,
            dtype=str(cfg["dtype"]),
        )


def _deploy_dtype(model_dtype: str) -> str:
    """fp32 checkpoints are served in fp16; bf16 and fp16 keep their dtype."""
    return model_dtype if model_dtype in ("float16", "bfloat16") else "float16"


def trtllm_family(cfg: Mapping[str, Any]) -> str:
    arch = cfg.get("architecture")
    if arch not in TRTLLM_ARCHITECTURES:
        raise SqDeployError(
            f"TensorRT-LLM checkpoint architecture {arch!r} is not supported; supported: {', '.join(sorted(TRTLLM_ARCHITECTURES))}"
        )
    return TRTLLM_ARCHITECTURES[arch]


def is_trtllm_config(cfg: Mapping[str, Any]) -> bool:
    return "architecture" in cfg and ("mapping" in cfg or "quantization" in cfg)


def read_config(path: str | Path) -> tuple[dict, Path]:
    """config.json of a directory (or the file itself), as a dict."""
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    try:
        return json.loads(f.read_text()), f
    except FileNotFoundError:
        raise SqDeployError(f"{f} does not exist; pass a model directory (or config.json) of a Hugging Face model or a TensorRT-LLM checkpoint") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise SqDeployError(f"{f} is unreadable ({exc}); restore the file") from None


@dataclass(frozen=True)
class WeightFormat:
    """Bytes per element of every quantized-linear tensor, in the engine's layout.

    ``bits`` is 16/32 for float weights. Scales: one per tensor, output channel or
    (output channel, group). ``zero_bytes`` > 0 adds one zero point per scale.
    ``input_vector_bytes``: a per-input-channel vector on every linear (AWQ / ModelOpt
    SmoothQuant ``prequant_scaling_factor``); ``row_input_vector_bytes`` one on the
    row-parallel linears only (the SmoothQuant plugin's ``smoother``).
    ``scalar_bytes_per_linear`` / ``scalar_bytes_per_layer``: static activation
    scales and the like. ``qkv_per_channel``: per-tensor plugin modes still scale
    the fused qkv per channel.
    """

    name: str
    bits: int
    granularity: str = "none"  # none | tensor | channel | group
    group_size: int | None = None
    scale_bytes: int = 0
    zero_bytes: int = 0
    input_vector_bytes: int = 0
    row_input_vector_bytes: int = 0
    scalar_bytes_per_linear: int = 0
    scalar_bytes_per_layer: int = 0
    qkv_per_channel: bool = False
    kv_cache_bits: int = 16
    act_bits: int = 16

    @property
    def quantized(self) -> bool:
        return self.granularity != "none"

    @classmethod
    def from_trtllm(cls, quantization: Mapping[str, Any] | None, dtype: str) -> WeightFormat:
        q = dict(quantization or {})
        algo, kv = q.get("quant_algo"), q.get("kv_cache_quant_algo")
        if algo not in SUPPORTED_QUANT_ALGOS:
            raise SqDeployError(f"quant_algo {algo!r} is not supported; supported: {', '.join(str(a) for a in SUPPORTED_QUANT_ALGOS)}")
        if kv not in SUPPORTED_KV_ALGOS:
            raise SqDeployError(f"kv_cache_quant_algo {kv!r} is not supported; supported: {', '.join(str(a) for a in SUPPORTED_KV_ALGOS)}")
        d = DTYPE_BYTES[dtype]
        kv_fields = {"kv_cache_bits": 8 if kv in ("INT8", "FP8") else 16, "scalar_bytes_per_layer": 8 if kv else 0}
        name = f"{algo or dtype}{' + ' + kv + ' KV' if kv else ''}"
        if algo is None:
            return cls(name=name, bits=8 * d, **kv_fields)
        if algo == "FP8":
            return cls(name=name, bits=8, granularity="tensor", scale_bytes=4, scalar_bytes_per_linear=4, act_bits=8, **kv_fields)
        if algo in WEIGHT_ONLY_ALGOS:
            return cls(name=name, bits=8 if algo == "W8A16" else 4, granularity="channel", scale_bytes=d, **kv_fields)
        if algo in GROUPWISE_ALGOS:
            g = int(q.get("group_size") or 128)
            return cls(
                name=f"{name} g{g}", bits=4, granularity="group", group_size=g, scale_bytes=d,
                zero_bytes=d if q.get("has_zero_point") else 0,
                input_vector_bytes=d if q.get("pre_quant_scale") else 0, **kv_fields,
            )
        if algo == "W8A8_SQ_PER_CHANNEL":
            return cls(name=name, bits=8, granularity="channel", scale_bytes=4, input_vector_bytes=d,
                       scalar_bytes_per_linear=4, act_bits=8, **kv_fields)
        static = not algo.endswith("PER_TOKEN_PLUGIN")
        # per layer: two norm scale_to_int [1]; static modes add two quantization_scaling_factor [1]
        kv_fields["scalar_bytes_per_layer"] += 8 + (8 if static else 0)
        return cls(
            name=name, bits=8, granularity="channel" if "PER_CHANNEL" in algo else "tensor", scale_bytes=4,
            row_input_vector_bytes=4, scalar_bytes_per_linear=4 if static else 0, qkv_per_channel=True,
            act_bits=8, **kv_fields,
        )


def quantization_for_scheme(scheme, kv_cache: str | None = None) -> dict[str, Any]:
    """The TensorRT-LLM ``quantization`` section a recipe's scheme exports to."""
    out: dict[str, Any] = {"quant_algo": None, "kv_cache_quant_algo": kv_cache}
    w, a = scheme.weight, scheme.act
    if w is None:
        return out
    if w.bits == 4:
        if w.granularity == "group":
            out.update(quant_algo="W4A16_AWQ", group_size=w.group_size, has_zero_point=not w.symmetric, pre_quant_scale=True)
        else:
            out["quant_algo"] = "W4A16"
        return out
    if a.kind == "none":
        out["quant_algo"] = "W8A16"
    elif a.kind == "static_tensor":
        out["quant_algo"] = "W8A8_SQ_PER_CHANNEL" if w.granularity == "channel" else "W8A8_SQ_PER_TENSOR_PLUGIN"
    elif a.kind == "dynamic_token":
        gran = "CHANNEL" if w.granularity == "channel" else "TENSOR"
        out["quant_algo"] = f"W8A8_SQ_PER_{gran}_PER_TOKEN_PLUGIN"
    else:
        raise SqDeployError(
            "dynamic per-tensor INT8 activations have no TensorRT-LLM engine layout; plan with a static or per-token recipe"
        )
    return out
