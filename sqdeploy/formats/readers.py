"""Open any model directory sq-deploy can score: HF, quantized, or an export target.

``sq-eval`` and the checkers ask :func:`open_model` and get something that turns token ids
into logits, whatever the directory holds (the reference model in PyTorch, an ONNX Runtime
session, a TensorRT-LLM checkpoint read back). The first reader that recognises the
directory opens it, so the more specific formats come first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.integrity import verify_recorded_files
from sqdeploy.formats.onnx import reader as onnx_reader
from sqdeploy.formats.opened import OpenedModel, OpenedReader
from sqdeploy.formats.trtllm import hf_unified
from sqdeploy.formats.trtllm import reader as trtllm_reader
from sqdeploy.model.checkpoint import HFCheckpoint
from sqdeploy.quantize.qmodel import QuantizedModel, is_quantized_dir

__all__ = ["READERS", "OpenedModel", "OpenedReader", "open_model", "register_reader"]


def _torch_model(kind: str, src_factory) -> Callable[[Path, str], OpenedModel]:
    def open_(path: Path, device: str) -> OpenedModel:
        from sqdeploy.evaluate.perplexity import model_logits_fn
        from sqdeploy.model.loading import load_model

        src = src_factory(path)
        model = load_model(src, torch.float32, device)
        return OpenedModel(kind, path, model_logits_fn(model), path, src.config.architecture, model)

    return open_


READERS: list[OpenedReader] = [
    hf_unified.READER,
    trtllm_reader.READER,
    onnx_reader.READER,
    OpenedReader("quantized", is_quantized_dir, _torch_model("quantized", QuantizedModel)),
    OpenedReader("hf", lambda p: (p / "config.json").exists() and not is_quantized_dir(p), _torch_model("hf", HFCheckpoint)),
]


def register_reader(reader: OpenedReader) -> None:
    """Add a reader for another format; it is asked before the built-in ones."""
    READERS.insert(0, reader)


def open_model(path: str | Path, device: str = "cpu") -> OpenedModel:
    p = Path(path)
    if not p.is_dir():
        raise SqDeployError(f"model directory {p} does not exist")
    verify_recorded_files(p)  # before the (possibly long) load: a swapped tokenizer or edited config is refused
    for reader in READERS:
        if reader.detect(p):
            return reader.open(p, device)
    raise SqDeployError(f"{p} is not a model directory sq-deploy can read (kinds: {', '.join(r.kind for r in READERS)})")
