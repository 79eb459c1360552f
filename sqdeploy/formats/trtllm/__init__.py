"""TensorRT-LLM targets: the engine-flow checkpoint and ModelOpt's unified HF checkpoint.

``TARGETS`` are ``sq-export --target trtllm`` (config.json +
rank{r}.safetensors for ``trtllm-build``, TensorRT-LLM <= 1.2; options
:class:`.options.TrtllmOptions`) and ``--target trtllm-hf`` (HF names +
hf_quant_config.json, for TensorRT-LLM's PyTorch backend; options
:class:`.options.TrtllmHfOptions`); ``reader`` opens checkpoints for ``sq-eval``;
``check`` is ``sq-check trtllm``.
"""

from __future__ import annotations

from sqdeploy.formats.target import Target
from sqdeploy.formats.trtllm.options import TrtllmHfOptions, TrtllmOptions


def _write(qdir, out, options, context):
    from sqdeploy.formats.trtllm.writer import write  # TensorRT-LLM writing code loads only when used

    return write(qdir, out, options, context.progress, context.shown_as, context.device)


def _resolve(model, options):
    from sqdeploy.formats.trtllm.writer import resolve

    return resolve(model, options)


def _write_hf(qdir, out, options, context):
    from sqdeploy.formats.trtllm.hf_unified import write

    return write(qdir, out, options, context.progress, context.shown_as, context.device)


def _resolve_hf(model, options):
    from sqdeploy.formats.trtllm.hf_unified import resolve

    return resolve(model, options)


TARGETS = (
    Target(
        name="trtllm",
        help="TensorRT-LLM checkpoint (config.json + rank{r}.safetensors) for trtllm-build, TensorRT-LLM <= 1.2",
        options=TrtllmOptions,
        write=_write,
        precheck=_resolve,
    ),
    Target(
        name="trtllm-hf",
        help="ModelOpt unified HF checkpoint (fp16 or W4A16_AWQ) for TensorRT-LLM's PyTorch backend",
        options=TrtllmHfOptions,
        write=_write_hf,
        precheck=_resolve_hf,
    ),
)
