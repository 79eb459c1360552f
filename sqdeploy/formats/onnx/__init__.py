"""ONNX export target: decoder graphs with KV cache (float, W8A8 QDQ, W4A16 QDQ or MatMulNBits).

Importing this package registers ``sq-export --target onnx``; ``reader`` registers the
``sq-eval`` reader for export directories.
"""

from __future__ import annotations

import argparse

from sqdeploy.formats.onnx.options import add_arguments as _add_arguments
from sqdeploy.formats.onnx.options import precheck
from sqdeploy.formats.targets import Target, register_target


def _arguments(g: argparse.ArgumentParser) -> None:
    _add_arguments(g)
    if "--no-reference-copy" not in g._option_string_actions:
        g.add_argument("--no-reference-copy", action="store_true",
                       help="exporting from a HF model: do not keep the quantized directory inside the export "
                       "(sq-check onnx then needs --reference QDIR)")


def _write(qdir, out, args):
    from sqdeploy.formats.onnx.writer import write

    return write(qdir, out, args)


register_target(Target(
    name="onnx",
    help="ONNX decoder graph with KV cache for ONNX Runtime and TensorRT",
    add_arguments=_arguments,
    write=_write,
    precheck=precheck,
))
