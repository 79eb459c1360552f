"""What an ONNX export is asked to be, and the checks that refuse what it cannot be.

Every refusal happens here, before quantization starts and before anything is
written: ``sq-export`` calls :func:`precheck` from the target's precheck hook, and
the writer resolves the same options again (a quantized directory may have been
produced by another command).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families.base import ModelConfig
from sqdeploy.core.schemes import QuantScheme

VARIANTS = ("tensorrt", "onnxruntime")
INT4_FORMATS = ("qdq", "matmulnbits")
DEFAULT_OPSET = 21
MIN_OPSET = 17  # LayerNormalization
MAX_OPSET = 23
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class OnnxOptions:
    """Resolved export options (no 'auto' left)."""

    variant: str = "tensorrt"
    dtype: str = "float32"  # of logits, KV cache and activations
    int4_format: str | None = None  # None when the weights are not N-bit weight-only
    opset: int = DEFAULT_OPSET
    external_data: bool = False  # force model.onnx.data even under 2 GB
    accuracy_level: int = 0  # MatMulNBits: 0 = exact float arithmetic, 4 = int8 activations
    lm_head: str = "float"  # "int8": per-channel INT8 round-to-nearest LM head (not in the QuantizedModel)

    @property
    def contrib(self) -> bool:
        return self.variant == "onnxruntime"


def _add(group, flag: str, **kw) -> None:
    """Add an option unless another target already declared the same flag."""
    if flag not in group._option_string_actions:
        group.add_argument(flag, **kw)


def add_arguments(g: argparse.ArgumentParser) -> None:
    _add(g, "--onnx-variant", choices=VARIANTS, default="tensorrt",
         help="tensorrt: standard ONNX ops only (TensorRT's ONNX parser, any runtime); "
         "onnxruntime: ONNX Runtime contrib ops (GroupQueryAttention, RotaryEmbedding, "
         "SkipSimplifiedLayerNormalization, MatMulNBits), fastest in ONNX Runtime")
    _add(g, "--dtype", choices=("auto", "float16", "float32"), default="auto",
         help="float type of activations, logits and KV cache (auto: the quantized model's storage dtype)")
    _add(g, "--int4-format", choices=("auto", *INT4_FORMATS), default="auto",
         help="weight-only N-bit linears: qdq (int4/uint4 initializer + block-wise DequantizeLinear, opset 21) or "
         "matmulnbits (ONNX Runtime's MatMulNBits); auto: matmulnbits for --onnx-variant onnxruntime, else qdq")
    _add(g, "--opset", type=int, default=None, help=f"ONNX opset (default {DEFAULT_OPSET}; {MIN_OPSET}..{MAX_OPSET})")
    _add(g, "--external-data", action="store_true",
         help="write weights to model.onnx.data even when the graph is under 2 GB")
    _add(g, "--int4-accuracy-level", type=int, choices=ACCURACY_LEVELS, default=0,
         help="MatMulNBits accuracy_level: 0 computes in the activation float type (exact), "
         "4 quantizes activations to int8 per block (faster on CPU, not bit-faithful)")
    _add(g, "--lm-head", choices=("float", "int8"), default="float",
         help="int8: weight-only INT8 (per channel, round to nearest) LM head, a 4x smaller read per decoded token; "
         "the quantized model keeps its LM head in float, so this leaves exact parity (default float)")


def resolve(args: argparse.Namespace, scheme: QuantScheme, cfg: ModelConfig, storage_dtype: str) -> OnnxOptions:
    """Options from the command line for this model and scheme; raises on anything the graph cannot express."""
    variant = getattr(args, "onnx_variant", "tensorrt")
    dtype = getattr(args, "dtype", "auto") or "auto"
    if dtype == "auto":
        dtype = "float16" if storage_dtype == "float16" else "float32"
    if dtype not in ("float16", "float32"):
        raise SqDeployError(f"--dtype {dtype}: the ONNX export writes float16 or float32 graphs; pass --dtype float16 or float32")
    weight_only = scheme.weight is not None and not scheme.act.quantized
    fmt = getattr(args, "int4_format", "auto") or "auto"
    int4_format = None
    if weight_only:
        int4_format = ("matmulnbits" if variant == "onnxruntime" else "qdq") if fmt == "auto" else fmt
    opset = getattr(args, "opset", None) or DEFAULT_OPSET
    opts = OnnxOptions(variant, dtype, int4_format, opset, bool(getattr(args, "external_data", False)),
                       int(getattr(args, "int4_accuracy_level", 0) or 0), getattr(args, "lm_head", "float") or "float")
    validate(opts, scheme, cfg, explicit_format=fmt != "auto")
    return opts


def validate(opts: OnnxOptions, scheme: QuantScheme, cfg: ModelConfig, explicit_format: bool = False) -> None:
    if not MIN_OPSET <= opts.opset <= MAX_OPSET:
        raise SqDeployError(f"--opset {opts.opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})")
    _check_heads(cfg, opts)
    if opts.lm_head == "int8" and (scheme.weight is None or scheme.act.quantized):
        raise SqDeployError("--lm-head int8 goes with weight-only recipes (w4a16-*, w8a16-*); drop it for this recipe")
    if scheme.weight is None:
        return
    act, w = scheme.act, scheme.weight
    if explicit_format and opts.int4_format is None:
        raise SqDeployError(f"--int4-format applies to weight-only schemes; {scheme.describe()} quantizes activations too: drop --int4-format")
    if opts.int4_format == "matmulnbits" and not opts.contrib:
        raise SqDeployError("MatMulNBits is an ONNX Runtime contrib op, which the tensorrt variant does not use; "
                            "pass --onnx-variant onnxruntime, or --int4-format qdq for standard ONNX")
    if opts.int4_format == "qdq" and w.bits == 4 and opts.opset < 21:
        raise SqDeployError(f"--opset {opts.opset} is too old for INT4 QDQ: int4/uint4 block-wise DequantizeLinear needs opset 21; "
                            "pass --opset 21 (or --onnx-variant onnxruntime --int4-format matmulnbits)")
    if act.quantized and opts.dtype == "float16" and opts.opset < 19:
        raise SqDeployError(f"--opset {opts.opset} is too old for float16 QuantizeLinear scales (opset 19); pass --opset 19 or later, or --dtype float32")
    if act.quantized and not act.static and not opts.contrib:
        raise SqDeployError(
            f"{scheme.describe()}: dynamic activation scales ({act.kind}) cannot be expressed in the tensorrt variant "
            "(TensorRT's explicit quantization needs a calibrated static scale per QuantizeLinear); "
            "use a static recipe such as w8a8-sq, or --onnx-variant onnxruntime")
    if act.quantized and w.bits != 8:
        raise SqDeployError(f"{scheme.describe()}: activation quantization is exported for INT8 weights only")


def _check_heads(cfg: ModelConfig, opts: OnnxOptions) -> None:
    if cfg.num_heads % cfg.num_kv_heads:
        raise SqDeployError(f"{cfg.num_heads} attention heads are not a multiple of {cfg.num_kv_heads} KV heads; "
                            "the ONNX export supports MHA and GQA layouts only")
    if cfg.position == "rope" and cfg.head_dim % 2:
        raise SqDeployError(f"head_dim {cfg.head_dim} is odd; rotary embedding needs an even head_dim")
    if opts.contrib and cfg.head_dim % 8:
        raise SqDeployError(f"head_dim {cfg.head_dim} is not a multiple of 8, which ONNX Runtime's GroupQueryAttention "
                            "needs; export with --onnx-variant tensorrt (standard attention ops)")


def precheck(src, args: argparse.Namespace) -> None:
    """Target.precheck: ``src`` is a QuantizedModel or a (recipe, config, family) tuple."""
    if isinstance(src, tuple):
        recipe, cfg, _family = src
        from sqdeploy.quantize.pipeline import storage_dtype

        dtype = str(storage_dtype(recipe, cfg)).replace("torch.", "")
        resolve(args, recipe.scheme, cfg, dtype)
    else:
        resolve(args, src.scheme, src.config, str(src.dtype).replace("torch.", ""))
