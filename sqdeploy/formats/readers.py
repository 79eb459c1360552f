"""Open any model directory sq-deploy can score: HF, quantized, or an export target.

Each kind registers a :class:`Reader`; ``sq-eval`` and the checkers ask
:func:`open_model` and get something that turns token ids into logits, whatever the
directory holds (the reference model in PyTorch, an ONNX Runtime session, a
TensorRT-LLM checkpoint read back).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sqdeploy.core.errors import SqDeployError
from sqdeploy.evaluate.perplexity import LogitsFn


@dataclass
class OpenedModel:
    kind: str
    path: Path
    logits_fn: LogitsFn
    tokenizer_path: Path
    description: str = ""
    model: torch.nn.Module | None = None


@dataclass(frozen=True)
class Reader:
    kind: str
    detect: Callable[[Path], bool]
    open: Callable[[Path, str], OpenedModel]


READERS: list[Reader] = []


def register_reader(reader: Reader) -> None:
    READERS.insert(0, reader)  # later registrations (more specific formats) win


def open_model(path: str | Path, device: str = "cpu") -> OpenedModel:
    _load_builtin_readers()
    p = Path(path)
    if not p.is_dir():
        raise SqDeployError(f"model directory {p} does not exist")
    from sqdeploy.core.integrity import verify_recorded_files

    verify_recorded_files(p)  # before the (possibly long) load: a swapped tokenizer or edited config is refused
    for reader in READERS:
        if reader.detect(p):
            return reader.open(p, device)
    raise SqDeployError(f"{p} is not a model directory sq-deploy can read (kinds: {', '.join(r.kind for r in READERS)})")


def _torch_model(kind: str, src_factory) -> Callable[[Path, str], OpenedModel]:
    def open_(path: Path, device: str) -> OpenedModel:
        from sqdeploy.evaluate.perplexity import model_logits_fn
        from sqdeploy.model.loading import load_model

        src = src_factory(path)
        model = load_model(src, torch.float32, device)
        return OpenedModel(kind, path, model_logits_fn(model), path, src.config.architecture, model)

    return open_


_LOADED = False


def _load_builtin_readers() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from sqdeploy.model.checkpoint import HFCheckpoint
    from sqdeploy.quantize.qmodel import QuantizedModel, is_quantized_dir

    READERS.append(Reader("hf", lambda p: (p / "config.json").exists() and not is_quantized_dir(p), _torch_model("hf", HFCheckpoint)))
    READERS.insert(0, Reader("quantized", is_quantized_dir, _torch_model("quantized", QuantizedModel)))
    for module in TARGET_READER_MODULES:
        __import__(module)


# export targets whose directories can be read back; each registers its Reader on import
TARGET_READER_MODULES: list[str] = ["sqdeploy.formats.onnx.reader", "sqdeploy.formats.trtllm.reader"]
