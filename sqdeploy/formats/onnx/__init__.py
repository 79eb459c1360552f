"""ONNX export target: decoder graphs with KV cache (float, W8A8 QDQ, W4A16 QDQ or MatMulNBits).

``TARGET`` is ``sq-export --target onnx`` (options: :class:`.options.OnnxExportOptions`);
``reader`` opens export directories for ``sq-eval``.
"""

from __future__ import annotations

from sqdeploy.formats.onnx.options import OnnxExportOptions, precheck
from sqdeploy.formats.target import Target


def _write(qdir, out, options, context):
    from sqdeploy.formats.onnx.writer import write

    return write(qdir, out, options, context)


TARGET = Target(
    name="onnx",
    help="ONNX decoder graph with KV cache for ONNX Runtime and TensorRT",
    options=OnnxExportOptions,
    write=_write,
    precheck=precheck,
)
