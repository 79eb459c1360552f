"""ONNX export target: decoder graphs with KV cache (float, W8A8 QDQ, W4A16 QDQ or MatMulNBits).

``TARGET`` is ``sq-export --target onnx``; ``reader`` opens export directories for ``sq-eval``.
"""

from __future__ import annotations

import argparse

from sqdeploy.formats.onnx.options import add_arguments as _add_arguments
from sqdeploy.formats.onnx.options import precheck
from sqdeploy.formats.target import Target


def _arguments(g: argparse.ArgumentParser) -> None:
    _add_arguments(g)
    if "--no-reference-copy" not in g._option_string_actions:
        g.add_argument("--no-reference-copy", action="store_true",
                       help="exporting from a HF model: do not keep the quantized directory inside the export "
                       "(sq-check onnx then needs --reference QDIR)")


def _write(qdir, out, args):
    from sqdeploy.formats.onnx.writer import write

    return write(qdir, out, args)


TARGET = Target(
    name="onnx",
    help="ONNX decoder graph with KV cache for ONNX Runtime and TensorRT",
    add_arguments=_arguments,
    write=_write,
    precheck=precheck,
)
