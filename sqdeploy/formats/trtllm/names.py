"""Every tensor of every rank of a TensorRT-LLM checkpoint: name, shape, dtype, TP rule.

Names come from the family record (``family.trtllm``) and from the per-algorithm
tables below; the writer, the checker and the reader all derive their expectations
from :func:`expected_tensors`, so they cannot disagree about the format.

Shapes are written with symbolic dims, evaluated per rank: ``out``/``in`` are the
module's output rows and input columns *on that rank* (a column-parallel module has
``out`` split and ``in`` whole; a row-parallel one the reverse), ``g`` is the group
size. A tensor whose dims mention the split one is split over the ranks; every other
tensor is replicated (the checker holds replicated tensors to byte equality).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqdeploy.core.families import ModelConfig
from sqdeploy.formats.trtllm.config import CheckpointSpec, kv_heads_per_rank

LAYER = "transformer.layers.{i}."


@dataclass(frozen=True)
class Rule:
    """One tensor of each linear module under an algorithm."""

    suffix: str
    dims: tuple[str, ...]
    dtype: str  # "int8" | "float32" | "model" (config dtype) | "float" (any float type)
    kind: str  # "qweight" | "weight" | "scale" (must be > 0) | "zero"
    only: str | None = None  # "row" / "column": only modules of that parallel kind
    flag: str | None = None  # a QuantSpec flag that must be set


# tensorrt_llm/quantization/layers.py, per quant_algo (checkpoint side: W4A16_AWQ is
# stored unpacked-by-rows and preprocessed by trtllm-build; W8A16/W4A16 are stored as
# float weights that trtllm-build quantizes)
ALGO_RULES: dict[str | None, tuple[Rule, ...]] = {
    None: (Rule("weight", ("out", "in"), "model", "weight"),),
    "W8A16": (Rule("weight", ("out", "in"), "model", "weight"),),
    "W4A16": (Rule("weight", ("out", "in"), "model", "weight"),),
    "W8A8_SQ_PER_CHANNEL": (
        Rule("weight", ("out", "in"), "int8", "qweight"),
        Rule("weights_scaling_factor", ("out",), "float32", "scale"),
        Rule("activation_scaling_factor", ("1",), "float32", "scale"),
        Rule("prequant_scaling_factor", ("in",), "model", "scale"),
    ),
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN": (
        Rule("weight", ("out", "in"), "int8", "qweight"),
        Rule("per_channel_scale", ("1", "out"), "float32", "scale"),
        Rule("smoother", ("1", "in"), "float32", "scale", only="row"),
    ),
    "W4A16_AWQ": (
        Rule("weight", ("out/2", "in"), "int8", "qweight"),
        Rule("weights_scaling_factor", ("out", "in/g"), "float", "scale"),
        Rule("prequant_scaling_factor", ("in",), "model", "scale", flag="pre_quant_scale"),
        Rule("zero", ("in/g", "out"), "model", "zero", flag="has_zero_point"),
    ),
}
SPLIT_DIM = {"column": ("out", "out/2"), "row": ("in", "in/g")}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str
    kind: str  # qweight weight scale zero bias norm embed lm_head kv_scale
    replicated: bool
    module: str | None = None  # the linear module a tensor belongs to (for decoding)
    layer: int | None = None


def rows_per_rank(cfg: ModelConfig, fuse: tuple[str, ...], tp: int) -> list[int]:
    """Rows each canonical member of a column module contributes to one rank's slice."""
    out = []
    for name in fuse:
        if name == "q":
            out.append(cfg.num_heads // tp * cfg.head_dim)
        elif name in ("k", "v"):
            out.append(kv_heads_per_rank(cfg, tp) * cfg.head_dim)
        else:
            out.append(cfg.linear_shape(name)[0] // tp)
    return out


def module_dims(spec: CheckpointSpec, module: str) -> dict[str, int]:
    """Per-rank values of the symbolic dims of a module."""
    info = spec.family.trtllm.linears[module]
    cfg, tp = spec.config, spec.tp
    _, first_in = cfg.linear_shape(info.fuse[0])
    if info.tp == "column":
        out, inp = sum(rows_per_rank(cfg, info.fuse, tp)), first_in
    else:
        out, inp = sum(cfg.linear_shape(n)[0] for n in info.fuse), first_in // tp
    g = spec.quant.group_size or 1
    return {"out": out, "in": inp, "out/2": out // 2, "in/g": inp // g, "1": 1}


def linear_rules(spec: CheckpointSpec, module: str) -> list[Rule]:
    parallel = spec.family.trtllm.linears[module].tp
    rules = [r for r in ALGO_RULES[spec.quant.algo] if r.only in (None, parallel)]
    return [r for r in rules if r.flag is None or getattr(spec.quant, r.flag)]


def _layer_tensors(spec: CheckpointSpec, i: int) -> dict[str, TensorSpec]:
    cfg, record = spec.config, spec.family.trtllm
    prefix = LAYER.format(i=i)
    out: dict[str, TensorSpec] = {}
    h = cfg.hidden_size
    for norm in record.norms:
        out[f"{prefix}{norm}.weight"] = TensorSpec((h,), "model", "norm", True, layer=i)
        if cfg.norm_has_bias:
            out[f"{prefix}{norm}.bias"] = TensorSpec((h,), "model", "norm", True, layer=i)
        if spec.quant.sq_plugin:
            # declared in the model dtype; TensorRT-LLM's converter writes float32 (accepted)
            out[f"{prefix}{norm}.scale_to_int"] = TensorSpec((1,), "model_or_float32", "scale", True, layer=i)
    for module, info in record.linears.items():
        dims = module_dims(spec, module)
        split = SPLIT_DIM[info.tp]
        for rule in linear_rules(spec, module):
            shape = tuple(dims[d] for d in rule.dims)
            out[f"{prefix}{module}.{rule.suffix}"] = TensorSpec(
                shape, rule.dtype, rule.kind, not any(d in split for d in rule.dims) or spec.tp == 1, module, i
            )
        if cfg.linear_has_bias(info.fuse[0]):
            col = info.tp == "column"
            out[f"{prefix}{module}.bias"] = TensorSpec((dims["out"],), "model", "bias", not col or spec.tp == 1, module, i)
    if spec.quant.kv == "INT8":
        out[f"{prefix}attention.kv_cache_scaling_factor"] = TensorSpec((1,), "float32", "scale", True, layer=i)
    return out


def global_rows(cfg: ModelConfig, canonical: str) -> int:
    """Rows of a global tensor as TensorRT-LLM stores it (learned positions without HF's offset rows)."""
    if canonical == "pos_embed.weight":
        return cfg.max_positions
    return cfg.vocab_size


def _global_tensors(spec: CheckpointSpec) -> dict[str, TensorSpec]:
    cfg, tp = spec.config, spec.tp
    out = {}
    for name, (canonical, split) in spec.family.trtllm.globals.items():
        if split == "replicated":
            out[name] = TensorSpec((cfg.hidden_size,), "model", "norm", True)
            continue
        rows = global_rows(cfg, canonical)
        sharded = split == "vocab" or spec.parallel_embedding
        kind = "lm_head" if split == "vocab" else "embed"
        shape = (math.ceil(rows / tp) if sharded else rows, cfg.hidden_size)
        out[name] = TensorSpec(shape, "model", kind, not sharded or tp == 1)
    return out


def expected_tensors(spec: CheckpointSpec) -> dict[str, TensorSpec]:
    """Name -> spec of every tensor a rank file must hold (identical names and shapes on every rank)."""
    out = _global_tensors(spec)
    for i in range(spec.config.num_layers):
        out.update(_layer_tensors(spec, i))
    return out
