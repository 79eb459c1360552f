"""What an ONNX export is asked to be, and the checks that refuse what it cannot be.

:class:`OnnxExportOptions` is what a caller asks for (``auto`` allowed); :func:`resolve`
turns it into :class:`OnnxOptions` for one quantized model. Every refusal happens there,
before quantization starts and before anything is written: the export calls
:func:`precheck` from the target's precheck hook, and the writer resolves the same
options again (a quantized directory may have been produced by another command).
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class OnnxExportOptions:
    """``export(..., OnnxExportOptions(...), out)``: what the ONNX export is asked to be (``sq-export --target onnx``'s flags)."""

    variant: str = "tensorrt"  # VARIANTS: standard ONNX ops only, or ONNX Runtime contrib ops
    dtype: str = "auto"  # float16, float32, or auto: the quantized model's storage dtype
    int4_format: str = "auto"  # qdq, matmulnbits, or auto: matmulnbits for the onnxruntime variant, else qdq
    opset: int | None = None  # None: DEFAULT_OPSET
    external_data: bool = False  # weights in model.onnx.data even under 2 GB
    int4_accuracy_level: int = 0  # MatMulNBits accuracy_level (0: exact)
    lm_head: str = "float"  # int8: weight-only INT8 LM head
    reference_copy: bool = True  # exporting from a HF model: keep the quantized directory inside the export


def resolve(request: OnnxExportOptions, scheme: QuantScheme, cfg: ModelConfig, storage_dtype: str) -> OnnxOptions:
    """The options for this model and scheme; raises on anything the graph cannot express."""
    variant = request.variant
    dtype = request.dtype or "auto"
    if dtype == "auto":
        dtype = "float16" if storage_dtype == "float16" else "float32"
    if dtype not in ("float16", "float32"):
        raise SqDeployError(f"--dtype {dtype}: the ONNX export writes float16 or float32 graphs; pass --dtype float16 or float32")
    weight_only = scheme.weight is not None and not scheme.act.quantized
    fmt = request.int4_format or "auto"
    int4_format = None
    if weight_only:
        int4_format = ("matmulnbits" if variant == "onnxruntime" else "qdq") if fmt == "auto" else fmt
    opset = request.opset or DEFAULT_OPSET
    opts = OnnxOptions(variant, dtype, int4_format, opset, bool(request.external_data), int(request.int4_accuracy_level or 0),
                       request.lm_head or "float")
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


def precheck(src, request: OnnxExportOptions) -> None:
    """Target.precheck: ``src`` is a QuantizedModel or a (recipe, config, family) tuple."""
    if isinstance(src, tuple):
        recipe, cfg, _family = src
        from sqdeploy.quantize.pipeline import storage_dtype

        dtype = str(storage_dtype(recipe, cfg)).replace("torch.", "")
        resolve(request, recipe.scheme, cfg, dtype)
    else:
        resolve(request, src.scheme, src.config, str(src.dtype).replace("torch.", ""))
