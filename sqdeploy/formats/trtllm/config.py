"""config.json of a TensorRT-LLM checkpoint: which quant_algo a scheme becomes, the
splits TensorRT-LLM can load, and the config written and read back.

TensorRT-LLM's own loader accepts unknown keys silently and only warns on many
mistakes (see docs/readme/trtllm.md), so both directions are strict here: a config
sq-deploy writes always names every field the engine builder would otherwise default,
and a config it reads must not carry a key or value it does not understand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from sqdeploy import __version__
from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families import FAMILIES, Family, ModelConfig
from sqdeploy.core.schemes import QuantScheme
from sqdeploy.model.layers import ACTIVATIONS

# tensorrt_llm/quantization/mode.py (QuantAlgo), 0.12 ... 1.2
KNOWN_ALGOS = (
    "W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W8A16_GPTQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL",
    "W8A8_SQ_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "W4A8_QSERVE_PER_GROUP", "W4A8_QSERVE_PER_CHANNEL", "FP8",
    "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES", "MIXED_PRECISION", "NVFP4", "W4A8_NVFP4_FP8",
    "W4A8_MXFP4_FP8", "W4A8_MXFP4_MXFP8", "W4A16_MXFP4", "NO_QUANT",
)
KNOWN_KV_ALGOS = ("INT8", "FP8", "NVFP4")
# what sq-deploy writes, checks and reads back
SUPPORTED_ALGOS = (None, "W8A16", "W4A16", "W4A16_AWQ", "W8A8_SQ_PER_CHANNEL", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN")
SUPPORTED_KV = (None, "INT8")
# the algorithm groups that decide a checkpoint's tensors and trtllm-build's plugins; they
# cover checkpoints of other producers (ModelOpt) too, which the planner and engine builder take
WEIGHT_ONLY = ("W8A16", "W4A16")  # float weights in the checkpoint; trtllm-build quantizes them
GROUPWISE = ("W4A16_AWQ", "W4A16_GPTQ")
SQ_PLUGIN = (
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_TENSOR_PLUGIN",
)
# what the memory planner and the engine builder take from any producer
PLANNABLE_ALGOS = (None, "W8A8_SQ_PER_CHANNEL", *SQ_PLUGIN, *WEIGHT_ONLY, *GROUPWISE, "FP8")
PLANNABLE_KV = (None, "INT8", "FP8")
# older TensorRT-LLM spellings of the families' architecture names, which trtllm-build still
# accepts in checkpoints of other producers (sq-deploy writes and reads the family record's name)
ARCHITECTURE_ALIASES = {"LLaMAForCausalLM": "LlamaForCausalLM", "QWenForCausalLM": "Qwen2ForCausalLM"}
GROUP_SIZES = (64, 128)  # the group sizes of TensorRT-LLM's group-wise INT4 GEMM kernels
TP_SIZES = (1, 2, 4, 8)

# (weight bits, weight granularity, activation kind) -> quant_algo; per-tensor weight
# scales are written broadcast per channel, which is exact.
SCHEME_TO_ALGO = {
    (None, None, "none"): None,
    (8, "channel", "static_tensor"): "W8A8_SQ_PER_CHANNEL",
    (8, "tensor", "static_tensor"): "W8A8_SQ_PER_CHANNEL",
    (8, "channel", "dynamic_token"): "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
    (8, "tensor", "dynamic_token"): "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
    (8, "channel", "none"): "W8A16",
    (8, "tensor", "none"): "W8A16",
    (4, "channel", "none"): "W4A16",
    (4, "group", "none"): "W4A16_AWQ",
}
DTYPES = ("float16", "bfloat16", "float32")

# config.json keys every TensorRT-LLM model config may carry (PretrainedConfig, its
# to_dict() additions, and what ModelOpt writes); family records add their own
GENERIC_KEYS = frozenset({
    "architecture", "dtype", "logits_dtype", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "intermediate_size", "head_size", "hidden_act", "norm_epsilon", "position_embedding_type",
    "max_position_embeddings", "rotary_embedding_dim", "rotary_pct", "use_parallel_embedding", "embedding_sharding_dim",
    "share_embedding_table", "mapping", "quantization", "qk_layernorm", "runtime_defaults", "producer", "rank",
    "decoder", "rmsnorm", "bias", "lm_head_bias", "residual_mlp", "tie_word_embeddings", "fc_after_embed",
    "use_input_layernorm_in_first_layer", "use_last_layernorm", "layer_idx_offset", "moe", "remove_duplicated_kv_heads",
    "embedding_multiplier", "attention_multiplier", "residual_multiplier", "output_multiplier_scale",
    "disable_weight_only_quant_plugin",
})
QUANT_KEYS = frozenset({
    "quant_algo", "kv_cache_quant_algo", "group_size", "has_zero_point", "pre_quant_scale", "exclude_modules",
    "smoothquant_val", "clamp_val", "use_meta_recipe", "producer",
})
# producer field of a checkpoint whose MLP sq-deploy padded: the real intermediate size
UNPADDED_KEY = "unpadded_intermediate_size"
MAPPING_KEYS = frozenset({"world_size", "tp_size", "pp_size", "cp_size", "moe_tp_size", "moe_ep_size", "gpus_per_node", "auto_parallel"})
# keep lm_head and every embedding in float (a list given replaces TensorRT-LLM's defaults)
EXCLUDE_MODULES = ["lm_head", "*vocab_embedding", "*position_embedding"]


@dataclass(frozen=True)
class QuantSpec:
    """The ``quantization`` section of a checkpoint."""

    algo: str | None = None
    kv: str | None = None
    group_size: int | None = None
    has_zero_point: bool = False
    pre_quant_scale: bool = False

    @property
    def weight_only(self) -> bool:
        return self.algo in WEIGHT_ONLY

    @property
    def groupwise(self) -> bool:
        return self.algo in GROUPWISE

    @property
    def sq_plugin(self) -> bool:
        return self.algo in SQ_PLUGIN

    def to_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"quant_algo": self.algo, "kv_cache_quant_algo": self.kv}
        if self.groupwise:
            out.update(group_size=self.group_size, has_zero_point=self.has_zero_point, pre_quant_scale=self.pre_quant_scale)
        if self.algo is not None:
            out["exclude_modules"] = list(EXCLUDE_MODULES)
        return out


def quant_spec_for(scheme: QuantScheme, kv: str | None = None, zero_point: bool = False) -> QuantSpec:
    """The TensorRT-LLM quantization of a sq-deploy scheme, or a one-line refusal."""
    w = scheme.weight
    key = (None, None, scheme.act.kind) if w is None else (w.bits, w.granularity, scheme.act.kind)
    if key not in SCHEME_TO_ALGO:
        raise SqDeployError(
            f"scheme {scheme.describe()} has no TensorRT-LLM equivalent (it has no dynamic per-tensor activations, "
            "nor activation quantization with weight-only layouts); use w8a8-sq, w8a8-sq-pertoken, w8a16-rtn or a w4a16 recipe"
        )
    algo = SCHEME_TO_ALGO[key]
    if kv not in SUPPORTED_KV:
        raise SqDeployError(f"--kv-cache {kv}: sq-deploy writes an INT8 KV cache only (--kv-cache int8)")
    if algo in GROUPWISE:
        if w.group_size not in GROUP_SIZES:
            raise SqDeployError(
                f"group size {w.group_size}: TensorRT-LLM's group-wise INT4 kernels take group 64 or 128; "
                "quantize with group_size 64 or 128"
            )
        return QuantSpec(algo, kv, w.group_size, has_zero_point=zero_point, pre_quant_scale=True)
    if zero_point:
        raise SqDeployError("--int4-zero-point applies to group-wise INT4 recipes only (w4a16-*)")
    return QuantSpec(algo, kv)


def kv_heads_per_rank(cfg: ModelConfig, tp: int) -> int:
    """TensorRT-LLM's Attention: ceil(num_kv_heads / tp) (K/V heads duplicated when tp > num_kv_heads)."""
    return (cfg.num_kv_heads + tp - 1) // tp


def module_shape(family: Family, cfg: ModelConfig, module: str, tp: int) -> tuple[int, int]:
    """Global (out, in) of a TensorRT-LLM linear as the engine builds it (qkv counts duplicated K/V heads)."""
    fuse = family.trtllm.linears[module].fuse
    if fuse == ("q", "k", "v"):
        out = tp * (cfg.num_heads // tp + 2 * kv_heads_per_rank(cfg, tp)) * cfg.head_dim
        return out, cfg.hidden_size
    shapes = [cfg.linear_shape(n) for n in fuse]
    return sum(o for o, _ in shapes), shapes[0][1]


def pad_multiple(quant: QuantSpec, tp: int) -> int | None:
    """The multiple TensorRT-LLM pads a quantized linear's global in/out features to (None: no padding).

    tensorrt_llm/quantization/layers.py: WeightOnlyQuantLinear / RowLinear use 64 * tp_size,
    WeightOnlyGroupwiseQuantLinear / RowLinear max(64, group_size) * tp_size (128 for W4A8).
    """
    if quant.weight_only:
        return 64 * tp
    if quant.groupwise:
        return max(64, quant.group_size) * tp
    return None


def _zero_preserving(act: str) -> bool:
    fn = ACTIVATIONS.get(act)
    return fn is not None and float(fn(torch.zeros(1))[0]) == 0.0


def padded_intermediate(cfg: ModelConfig, quant: QuantSpec, tp: int) -> int:
    """The MLP intermediate size a group-wise INT4 checkpoint is written with at this tp.

    TensorRT-LLM pads a group-wise INT4 linear's global features up to ``pad_multiple``
    and then expects padded rank tensors, which its loader only builds itself for GPTQ
    (zero weights, unit scales, zero zero-points, appended after the last row) and refuses
    for ModelOpt-style AWQ checkpoints. So sq-deploy writes that padding into the checkpoint
    and the padded size into ``intermediate_size`` (ModelOpt likewise writes its per-rank
    MLP width times tp). The result is exact only where the padded rows give zeros:
    the real columns must end on a group border (else padding would change a group's
    scale) and a non-gated MLP's activation must map 0 to 0 (a gated MLP multiplies by
    the zero ``up`` rows). Anything else keeps the real size (and is refused by the
    split check). Weight-only float checkpoints are not padded: trtllm-build quantizes
    them per channel, and an all-zero channel has no scale.
    """
    inter = cfg.intermediate_size
    multiple = pad_multiple(quant, tp) if quant.groupwise else None
    if not multiple or inter % multiple == 0 or inter % quant.group_size:
        return inter
    if not cfg.gated_mlp and not _zero_preserving(cfg.act):
        return inter
    return math.ceil(inter / multiple) * multiple


def split_problems(family: Family, cfg: ModelConfig, quant: QuantSpec, tp: int, pad: bool = False) -> list[str]:
    """Why TensorRT-LLM could not build or load this model at this tensor-parallel size (empty: it can).

    ``pad``: as sq-deploy writes it, with the MLP padded where that is exact (:func:`padded_intermediate`).
    """
    out = []
    if tp < 1:
        return [f"tp {tp} must be >= 1"]
    if pad:
        cfg = replace(cfg, intermediate_size=padded_intermediate(cfg, quant, tp))
    if cfg.num_heads % tp:
        out.append(f"{cfg.num_heads} attention heads do not split over {tp} ranks")
    kv = cfg.num_kv_heads
    if kv >= tp and kv % tp:
        out.append(f"{kv} KV heads do not split over {tp} ranks")
    if kv < tp and tp % kv:
        out.append(f"{kv} KV heads cannot be duplicated evenly over {tp} ranks")
    if cfg.intermediate_size % tp:
        out.append(f"intermediate size {cfg.intermediate_size} does not split over {tp} ranks")
    multiple = pad_multiple(quant, tp)
    if quant.weight_only:
        what = "weight-only linears are padded to multiples of 64 * tp"
    elif quant.groupwise:
        what = f"group-wise INT4 linears are padded to multiples of max(64, group {quant.group_size}) * tp"
        if cfg.head_dim % 2:
            out.append(f"head size {cfg.head_dim} is odd: INT4 rows are packed in pairs")
    if multiple:
        bad = []
        for module in family.trtllm.linears:
            o, i = module_shape(family, cfg, module, tp)
            if o % multiple or i % multiple:
                bad.append(f"{module} (in {i}, out {o})")
        if bad:
            more = f" and {len(bad) - 2} more" if len(bad) > 2 else ""
            out.append(f"{what} = {multiple}, which {', '.join(bad[:2])}{more} are not (TensorRT-LLM pads them and then cannot load the unpadded checkpoint)")
    return out


def check_split(family: Family, cfg: ModelConfig, quant: QuantSpec, tp: int, pp: int = 1, pad: bool = False) -> None:
    """Refuse a split TensorRT-LLM cannot run, naming the tp (or group size) that would work.

    ``pad``: the writer pads the MLP intermediate size where that is exact, so only what
    padding cannot fix (attention and hidden dims, odd groups) is refused.
    """
    if pp != 1:
        raise SqDeployError(f"--pp {pp}: sq-deploy writes pipeline-parallel size 1 only; use --pp 1 (tensor parallelism: --tp)")
    problems = split_problems(family, cfg, quant, tp, pad)
    if not problems:
        return
    fixes = []
    ok = [t for t in TP_SIZES if not split_problems(family, cfg, quant, t, pad)]
    if ok:
        fixes.append(f"use --tp {' or '.join(map(str, ok))}")
    if quant.groupwise and quant.group_size != 64:
        alt = QuantSpec(quant.algo, quant.kv, 64, quant.has_zero_point, quant.pre_quant_scale)
        if not split_problems(family, cfg, alt, tp, pad):
            fixes.append(f"quantize with group_size 64 (which allows --tp {tp})")
    remedy = ", or ".join(fixes) if fixes else "no tensor-parallel size in 1, 2, 4, 8 works for this model and scheme"
    raise SqDeployError(f"--tp {tp} is not possible for this model: {'; '.join(problems)}; {remedy}")


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


def rotary_scaling(cfg: ModelConfig) -> dict | None:
    """HF rope parameters as TensorRT-LLM's rotary_scaling (type and factor), without the base."""
    if cfg.rope_scaling is None:
        return None
    return {k: v for k, v in cfg.rope_scaling.items() if k != "rope_theta"}


def build_config(family: Family, cfg: ModelConfig, quant: QuantSpec, tp: int, dtype: str, pad: bool = False) -> dict[str, Any]:
    """TensorRT-LLM's PretrainedConfig.to_dict() for this model, every builder default spelled out.

    ``pad``: with the MLP padded (:func:`padded_intermediate`), ``intermediate_size`` is the
    padded size TensorRT-LLM builds, and ``producer.unpadded_intermediate_size`` keeps the
    real one (TensorRT-LLM does not read it; ``sq-check trtllm`` verifies the padding by it).
    """
    record = family.trtllm
    producer: dict[str, Any] = {"name": "sq-deploy", "version": __version__}
    inter = padded_intermediate(cfg, quant, tp) if pad else cfg.intermediate_size
    if inter != cfg.intermediate_size:
        producer[UNPADDED_KEY] = cfg.intermediate_size
        cfg = replace(cfg, intermediate_size=inter)
    out: dict[str, Any] = {
        "producer": producer,
        "architecture": record.architecture,
        "dtype": dtype,
        "logits_dtype": "float32",
    }
    for key, (field, _) in record.config_fields.items():
        out[key] = rotary_scaling(cfg) if field == "rope_scaling" else _plain(getattr(cfg, field))
    out.update(record.config)
    out.update(
        use_parallel_embedding=True,
        embedding_sharding_dim=0,
        share_embedding_table=False,
        mapping={"world_size": tp, "tp_size": tp, "pp_size": 1},
        quantization=quant.to_config(),
    )
    return out


@dataclass(frozen=True)
class CheckpointSpec:
    """What a checkpoint's config.json says, validated: everything the checker and reader need."""

    family: Family
    config: ModelConfig
    quant: QuantSpec
    tp: int
    dtype: str
    parallel_embedding: bool
    raw: Mapping[str, Any]
    unpadded_intermediate: int | None = None  # the real MLP width of a padded checkpoint (None: not padded)


def family_for_architecture(arch: Any, aliases: bool = False) -> Family:
    """The family whose TensorRT-LLM record names ``arch`` (with ``aliases``: also an older spelling of it)."""
    name = ARCHITECTURE_ALIASES.get(arch, arch) if aliases and isinstance(arch, str) else arch
    for fam in FAMILIES.values():
        if fam.trtllm is not None and fam.trtllm.architecture == name:
            return fam
    known = sorted(f.trtllm.architecture for f in FAMILIES.values() if f.trtllm)
    if aliases:
        known = sorted([*known, *ARCHITECTURE_ALIASES])
    raise SqDeployError(f"config.json: architecture {arch!r} is not supported; supported: {', '.join(known)}")


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise SqDeployError(f"config.json: {msg}")


def _check_keys(section: str, d: Any, allowed: frozenset) -> None:
    _expect(isinstance(d, dict), f"'{section}' must be an object")
    unknown = sorted(set(d) - allowed)
    _expect(not unknown, f"unknown key(s) {', '.join(unknown)} in {section} (a typo? TensorRT-LLM would ignore them silently)")


def parse_quant(q: Any) -> QuantSpec:
    _check_keys("quantization", q, QUANT_KEYS)
    algo, kv = q.get("quant_algo"), q.get("kv_cache_quant_algo")
    _expect(algo is None or algo in KNOWN_ALGOS, f"unknown quant_algo {algo!r}")
    _expect(kv is None or kv in KNOWN_KV_ALGOS, f"unknown kv_cache_quant_algo {kv!r}")
    _expect(algo in SUPPORTED_ALGOS, f"quant_algo {algo} is not one sq-deploy reads ({', '.join(map(str, SUPPORTED_ALGOS))})")
    _expect(kv in SUPPORTED_KV, f"kv_cache_quant_algo {kv} is not one sq-deploy reads (INT8 or none)")
    spec = QuantSpec(algo, kv, q.get("group_size", 128), bool(q.get("has_zero_point", False)), bool(q.get("pre_quant_scale", False)))
    if spec.groupwise:
        _expect(spec.group_size in GROUP_SIZES, f"group_size {spec.group_size} is not one TensorRT-LLM's kernels take (64, 128)")
    else:
        _expect(not spec.has_zero_point, f"has_zero_point is only meaningful for group-wise algorithms, not {algo}")
        spec = QuantSpec(algo, kv)
    excl = q.get("exclude_modules")
    if spec.weight_only and excl is not None:
        # a list replaces TensorRT-LLM's defaults: the embedding would become a weight-only one
        _expect("*vocab_embedding" in excl, "exclude_modules must list '*vocab_embedding' for weight-only algorithms")
    return spec


def _parse_mapping(m: Any) -> int:
    _check_keys("mapping", m, MAPPING_KEYS)
    tp, pp, cp = m.get("tp_size", 1), m.get("pp_size", 1), m.get("cp_size", 1)
    _expect(all(isinstance(v, int) and v >= 1 for v in (tp, pp, cp)), "mapping sizes must be positive integers")
    _expect(m.get("world_size") == tp * pp * cp, f"mapping world_size {m.get('world_size')} != tp_size * pp_size * cp_size ({tp * pp * cp})")
    _expect(pp == 1 and cp == 1, "pp_size and cp_size must be 1 (sq-deploy reads tensor-parallel checkpoints only)")
    _expect(m.get("moe_tp_size", tp) * m.get("moe_ep_size", 1) == tp, "moe_tp_size * moe_ep_size != tp_size")
    return tp


def model_config(family: Family, raw: Mapping[str, Any]) -> ModelConfig:
    """The model a checkpoint's config.json describes, read back through the family's config fields."""
    hf: dict[str, Any] = {"architectures": [family.architectures[0]], "model_type": family.name, "dtype": raw["dtype"]}
    for key, (_, hf_key) in family.trtllm.config_fields.items():
        if raw.get(key) is not None:
            hf[hf_key] = raw[key]
    try:
        return family.config_from_hf(hf)
    except KeyError as exc:
        raise SqDeployError(f"config.json: required key for {raw['architecture']} is missing ({exc.args[0]})") from None
    except (TypeError, ValueError) as exc:
        raise SqDeployError(f"config.json: inconsistent model fields ({exc})") from None


def parse_config(raw: Any) -> CheckpointSpec:
    """Validate a checkpoint's config.json; a SqDeployError names the first problem."""
    _expect(isinstance(raw, dict), "must be a JSON object")
    for key in ("architecture", "dtype", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "mapping", "quantization"):
        _expect(key in raw, f"required key '{key}' is missing")
    family = family_for_architecture(raw["architecture"])
    record = family.trtllm
    _check_keys("the top level", raw, GENERIC_KEYS | set(record.config_fields) | set(record.config))
    _expect(raw["dtype"] in DTYPES, f"dtype {raw['dtype']!r} is not one of {', '.join(DTYPES)}")
    for key, value in record.config.items():
        if key in ("qwen_type", "do_layer_norm_before", "position_embedding_type"):
            _expect(raw.get(key) == value, f"{key} must be {value!r} for {raw['architecture']} (got {raw.get(key)!r})")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        _expect(isinstance(raw[key], int) and raw[key] > 0, f"{key} must be a positive integer")
    parallel = raw.get("use_parallel_embedding", False)
    _expect(isinstance(parallel, bool), "use_parallel_embedding must be true or false")
    _expect(not parallel or raw.get("embedding_sharding_dim", 0) == 0, "embedding_sharding_dim 1 is not supported (use 0)")
    tp = _parse_mapping(raw["mapping"])
    quant = parse_quant(raw["quantization"])
    cfg = model_config(family, raw)
    _expect(cfg.num_heads % cfg.num_kv_heads == 0, f"num_attention_heads {cfg.num_heads} is not a multiple of num_key_value_heads {cfg.num_kv_heads}")
    problems = split_problems(family, cfg, quant, tp)
    _expect(not problems, f"tp_size {tp}: {'; '.join(problems)}")
    return CheckpointSpec(family, cfg, quant, tp, raw["dtype"], parallel, raw, _unpadded(raw, cfg, quant))


def _unpadded(raw: Mapping[str, Any], cfg: ModelConfig, quant: QuantSpec) -> int | None:
    """The real MLP width recorded by sq-deploy's padding, checked against the padded one."""
    producer = raw.get("producer")
    real = producer.get(UNPADDED_KEY) if isinstance(producer, dict) else None
    if real is None:
        return None
    inter = cfg.intermediate_size
    _expect(isinstance(real, int) and 0 < real < inter, f"producer {UNPADDED_KEY} {real!r} must be a positive integer below intermediate_size {inter}")
    _expect(quant.groupwise and real % quant.group_size == 0,
            f"producer {UNPADDED_KEY} {real}: MLP padding is written for group-wise INT4 with whole groups only")
    return real
