"""TensorRT-LLM targets: the engine-flow checkpoint and ModelOpt's unified HF checkpoint.

``TARGETS`` are ``sq-export --target trtllm`` (config.json +
rank{r}.safetensors for ``trtllm-build``, TensorRT-LLM <= 1.2) and ``--target
trtllm-hf`` (HF names + hf_quant_config.json, for TensorRT-LLM's PyTorch backend);
``reader`` opens checkpoints for ``sq-eval``; ``check`` is ``sq-check trtllm``.
"""

from __future__ import annotations

import argparse

from sqdeploy.formats.target import Target


def _add(group, flag: str, **kw) -> None:
    """Add an option unless another target already declared the same flag."""
    if flag not in group._option_string_actions:
        group.add_argument(flag, **kw)


def _arguments(g: argparse.ArgumentParser) -> None:
    _add(g, "--tp", type=int, default=1, help="tensor-parallel size: one rank{r}.safetensors per rank (1, 2, 4, 8)")
    _add(g, "--pp", type=int, default=1, help="pipeline-parallel size (only 1)")
    _add(g, "--kv-cache", choices=("int8",), default=None,
         help="INT8 KV cache: kv_cache_scaling_factor = max(K, V abs-max) / 127 per layer (needs a calibrated recipe)")
    _add(g, "--int4-zero-point", action="store_true",
         help="EXPERIMENTAL: keep an asymmetric INT4 recipe's zero points (has_zero_point); no NVIDIA tool writes "
         "or tests these. Default: re-quantize symmetrically from the smoothed float weights")
    _add(g, "--int4-requant-clip", choices=("search", "none"), default="search",
         help="symmetric INT4 re-quantization: search each group's clipping range for the symmetric grid (default) "
         "or keep the full range")
    _add(g, "--eval-text", default=None,
         help="after writing, score the export and the quantized model on this held-out text (perplexity of both)")
    _add(g, "--eval-windows", type=int, default=24, help="windows of 512 tokens for --eval-text (default 24)")


def _write(qdir, out, args):
    from sqdeploy.formats.trtllm.writer import write  # TensorRT-LLM writing code loads only when used

    return write(qdir, out, args)


def _resolve(model, args):
    from sqdeploy.formats.trtllm.writer import resolve

    return resolve(model, args)


def _write_hf(qdir, out, args):
    from sqdeploy.formats.trtllm.hf_unified import write

    return write(qdir, out, args)


def _resolve_hf(model, args):
    from sqdeploy.formats.trtllm.hf_unified import resolve

    return resolve(model, args)


TARGETS = (
    Target(
        name="trtllm",
        help="TensorRT-LLM checkpoint (config.json + rank{r}.safetensors) for trtllm-build, TensorRT-LLM <= 1.2",
        add_arguments=_arguments,
        write=_write,
        precheck=_resolve,
    ),
    Target(
        name="trtllm-hf",
        help="ModelOpt unified HF checkpoint (fp16 or W4A16_AWQ) for TensorRT-LLM's PyTorch backend",
        add_arguments=_arguments,
        write=_write_hf,
        precheck=_resolve_hf,
    ),
)
