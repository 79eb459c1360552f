"""TensorRT-LLM targets: the engine-flow checkpoint and ModelOpt's unified HF checkpoint.

Importing this package registers ``sq-export --target trtllm`` (config.json +
rank{r}.safetensors for ``trtllm-build``, TensorRT-LLM <= 1.2) and ``--target
trtllm-hf`` (HF names + hf_quant_config.json, for TensorRT-LLM's PyTorch backend);
``reader`` registers the ``sq-eval`` reader; ``check`` is ``sq-check trtllm``.
"""

from __future__ import annotations

import argparse

from sqdeploy.formats.targets import Target, register_target


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


def _lazy(module: str, name: str):
    """A target hook that imports its module on first call (TensorRT-LLM code stays unloaded until used)."""

    def hook(*args):
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{module}"), name)(*args)

    return hook


register_target(Target(
    name="trtllm",
    help="TensorRT-LLM checkpoint (config.json + rank{r}.safetensors) for trtllm-build, TensorRT-LLM <= 1.2",
    add_arguments=_arguments,
    write=_lazy("writer", "write"),
    precheck=_lazy("writer", "resolve"),
))
register_target(Target(
    name="trtllm-hf",
    help="ModelOpt unified HF checkpoint (fp16 or W4A16_AWQ) for TensorRT-LLM's PyTorch backend",
    add_arguments=_arguments,
    write=_lazy("hf_unified", "write"),
    precheck=_lazy("hf_unified", "resolve"),
))
