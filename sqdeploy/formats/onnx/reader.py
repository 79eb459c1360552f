"""``sq-eval DIR`` on an ONNX export: logits from ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

from sqdeploy.formats.onnx.contract import is_onnx_dir
from sqdeploy.formats.opened import OpenedModel, OpenedReader


def open_onnx(path: Path, device: str) -> OpenedModel:
    from sqdeploy.formats.onnx.session import OnnxDecoder, SessionConfig

    dec = OnnxDecoder(path, SessionConfig(provider=device))
    m = dec.meta
    desc = f"ONNX {m['variant']} {m['dtype']} {m['quantization']['recipe']}" + (f" {m['int4_format']}" if m["int4_format"] else "")
    return OpenedModel("onnx", path, dec.logits_fn, path, desc, None)


READER = OpenedReader("onnx", is_onnx_dir, open_onnx)
