"""``sq-export``'s flags for each export target, and the options object each target is given.

The targets take frozen options (:mod:`sqdeploy.formats.onnx.options`,
:mod:`sqdeploy.formats.trtllm.options`); this module is the only place their flags are
declared and read. ``--target trtllm`` and ``--target trtllm-hf`` share one set of flags; the
unified HF checkpoint refuses the ones it cannot honour.
"""

from __future__ import annotations

import argparse
from typing import Callable

from sqdeploy.core.errors import SqDeployError
from sqdeploy.formats.onnx.options import (
    ACCURACY_LEVELS,
    DEFAULT_OPSET,
    INT4_FORMATS,
    MAX_OPSET,
    MIN_OPSET,
    VARIANTS,
    OnnxExportOptions,
)
from sqdeploy.formats.trtllm.options import KV_CACHES, REQUANT_CLIPS, TrtllmHfOptions, TrtllmOptions


def add_onnx_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--onnx-variant", choices=VARIANTS, default="tensorrt",
                   help="tensorrt: standard ONNX ops only (TensorRT's ONNX parser, any runtime); "
                   "onnxruntime: ONNX Runtime contrib ops (GroupQueryAttention, RotaryEmbedding, "
                   "SkipSimplifiedLayerNormalization, MatMulNBits), fastest in ONNX Runtime")
    g.add_argument("--dtype", choices=("auto", "float16", "float32"), default="auto",
                   help="float type of activations, logits and KV cache (auto: the quantized model's storage dtype)")
    g.add_argument("--int4-format", choices=("auto", *INT4_FORMATS), default="auto",
                   help="weight-only N-bit linears: qdq (int4/uint4 initializer + block-wise DequantizeLinear, opset 21) or "
                   "matmulnbits (ONNX Runtime's MatMulNBits); auto: matmulnbits for --onnx-variant onnxruntime, else qdq")
    g.add_argument("--opset", type=int, default=None, help=f"ONNX opset (default {DEFAULT_OPSET}; {MIN_OPSET}..{MAX_OPSET})")
    g.add_argument("--external-data", action="store_true",
                   help="write weights to model.onnx.data even when the graph is under 2 GB")
    g.add_argument("--int4-accuracy-level", type=int, choices=ACCURACY_LEVELS, default=0,
                   help="MatMulNBits accuracy_level: 0 computes in the activation float type (exact), "
                   "4 quantizes activations to int8 per block (faster on CPU, not bit-faithful)")
    g.add_argument("--lm-head", choices=("float", "int8"), default="float",
                   help="int8: weight-only INT8 (per channel, round to nearest) LM head, a 4x smaller read per decoded "
                   "token; the quantized model keeps its LM head in float, so this leaves exact parity (default float)")
    g.add_argument("--no-reference-copy", action="store_true",
                   help="exporting from a HF model: do not keep the quantized directory inside the export "
                   "(sq-check onnx then needs --reference QDIR)")


def add_trtllm_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size: one rank{r}.safetensors per rank (1, 2, 4, 8)")
    g.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (only 1)")
    g.add_argument("--kv-cache", choices=KV_CACHES, default=None,
                   help="INT8 KV cache: kv_cache_scaling_factor = max(K, V abs-max) / 127 per layer (needs a calibrated recipe)")
    g.add_argument("--int4-zero-point", action="store_true",
                   help="EXPERIMENTAL: keep an asymmetric INT4 recipe's zero points (has_zero_point); no NVIDIA tool writes "
                   "or tests these. Default: re-quantize symmetrically from the smoothed float weights")
    g.add_argument("--int4-requant-clip", choices=REQUANT_CLIPS, default="search",
                   help="symmetric INT4 re-quantization: search each group's clipping range for the symmetric grid (default) "
                   "or keep the full range")
    g.add_argument("--eval-text", default=None,
                   help="after writing, score the export and the quantized model on this held-out text (perplexity of both)")
    g.add_argument("--eval-windows", type=int, default=24, help="windows of 512 tokens for --eval-text (default 24)")


def onnx_options(args: argparse.Namespace) -> OnnxExportOptions:
    return OnnxExportOptions(variant=args.onnx_variant, dtype=args.dtype, int4_format=args.int4_format, opset=args.opset,
                             external_data=args.external_data, int4_accuracy_level=args.int4_accuracy_level,
                             lm_head=args.lm_head, reference_copy=not args.no_reference_copy)


def trtllm_options(args: argparse.Namespace) -> TrtllmOptions:
    return TrtllmOptions(tp=args.tp, pp=args.pp, kv_cache=args.kv_cache, int4_zero_point=args.int4_zero_point,
                         int4_requant_clip=args.int4_requant_clip, eval_text=args.eval_text, eval_windows=args.eval_windows)


def trtllm_hf_options(args: argparse.Namespace) -> TrtllmHfOptions:
    """The shared TensorRT-LLM flags the unified HF checkpoint cannot honour are refused, not ignored."""
    if args.kv_cache:
        raise SqDeployError("--target trtllm-hf: the PyTorch backend's KV-cache quantization is FP8 only; drop --kv-cache")
    if args.tp != 1 or args.pp != 1:
        raise SqDeployError("--target trtllm-hf is not sharded: drop --tp/--pp and set tensor_parallel_size when serving it")
    if args.int4_zero_point:
        raise SqDeployError("--int4-zero-point is only offered (experimentally) for --target trtllm")
    return TrtllmHfOptions()


# help-group title -> the flags it declares (shared by the targets that read them)
FLAG_GROUPS: dict[str, Callable[[argparse._ArgumentGroup], None]] = {
    "--target onnx": add_onnx_arguments,
    "--target trtllm": add_trtllm_arguments,
}
# target name -> its options from the parsed flags (a target not listed gets its default options)
OPTIONS: dict[str, Callable[[argparse.Namespace], object]] = {
    "onnx": onnx_options,
    "trtllm": trtllm_options,
    "trtllm-hf": trtllm_hf_options,
}


def add_target_arguments(ap: argparse.ArgumentParser) -> None:
    for title, add in FLAG_GROUPS.items():
        add(ap.add_argument_group(title))


def options_from(args: argparse.Namespace) -> object:
    from sqdeploy.formats.targets import get_target

    target = get_target(args.target)
    convert = OPTIONS.get(target.name)
    return convert(args) if convert is not None else target.options()
