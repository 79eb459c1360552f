"""What the memory planner needs to know about a model and its weight format.

The model is the model layer's :class:`ModelConfig`, read from a Hugging Face
``config.json`` through the family registry or from a TensorRT-LLM checkpoint's
``config.json`` through the TensorRT-LLM format's own reader, so every family is read
the same way everywhere. A :class:`WeightFormat` says how many bytes each weight, scale,
zero point and per-channel vector takes on the GPU; it is derived from a TensorRT-LLM
``quantization`` section, and a recipe's scheme is first mapped to that section by the
TensorRT-LLM writer's own table (:func:`quantization_for_scheme`), so a plan counts
exactly what ``sq-export --target trtllm`` writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families import Family, ModelConfig, family_for_hf_config
from sqdeploy.core.schemes import QuantScheme
from sqdeploy.formats.trtllm.config import (
    GROUPWISE,
    PLANNABLE_ALGOS,
    PLANNABLE_KV,
    WEIGHT_ONLY,
    family_for_architecture,
    model_config,
    quant_spec_for,
)

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def dtype_bytes(cfg: ModelConfig) -> int:
    """Bytes of one element of the dtype the model is deployed in."""
    return DTYPE_BYTES[cfg.dtype]


def config_from_hf(cfg: Mapping[str, Any], dtype: str | None = None) -> ModelConfig:
    """A Hugging Face config.json as the model layer reads it, in the dtype it is deployed in."""
    mc = family_for_hf_config(cfg).config_from_hf(cfg)
    return replace(mc, dtype=dtype or _deploy_dtype(mc.dtype))


def config_from_trtllm(cfg: Mapping[str, Any]) -> ModelConfig:
    """A TensorRT-LLM checkpoint's config.json, read by the TensorRT-LLM format's own reader."""
    return model_config(trtllm_family(cfg), cfg)


def _deploy_dtype(model_dtype: str) -> str:
    """fp32 checkpoints are served in fp16; bf16 and fp16 keep their dtype."""
    return model_dtype if model_dtype in ("float16", "bfloat16") else "float16"


def trtllm_family(cfg: Mapping[str, Any]) -> Family:
    """The family of a TensorRT-LLM checkpoint's architecture (older spellings included)."""
    return family_for_architecture(cfg.get("architecture"), aliases=True)


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
        if algo not in PLANNABLE_ALGOS:
            raise SqDeployError(f"quant_algo {algo!r} is not supported; supported: {', '.join(str(a) for a in PLANNABLE_ALGOS)}")
        if kv not in PLANNABLE_KV:
            raise SqDeployError(f"kv_cache_quant_algo {kv!r} is not supported; supported: {', '.join(str(a) for a in PLANNABLE_KV)}")
        d = DTYPE_BYTES[dtype]
        kv_fields = {"kv_cache_bits": 8 if kv in ("INT8", "FP8") else 16, "scalar_bytes_per_layer": 8 if kv else 0}
        name = f"{algo or dtype}{' + ' + kv + ' KV' if kv else ''}"
        if algo is None:
            return cls(name=name, bits=8 * d, **kv_fields)
        if algo == "FP8":
            return cls(name=name, bits=8, granularity="tensor", scale_bytes=4, scalar_bytes_per_linear=4, act_bits=8, **kv_fields)
        if algo in WEIGHT_ONLY:
            return cls(name=name, bits=8 if algo == "W8A16" else 4, granularity="channel", scale_bytes=d, **kv_fields)
        if algo in GROUPWISE:
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


def quantization_for_scheme(scheme: QuantScheme, kv_cache: str | None = None, zero_point: bool = False) -> dict[str, Any]:
    """The ``quantization`` section ``sq-export --target trtllm`` writes for a recipe's scheme
    (``zero_point``: with ``--int4-zero-point``); the writer's table, refusals included."""
    return quant_spec_for(scheme, kv_cache, zero_point).to_config()
