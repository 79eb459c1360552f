"""What opening a model directory gives back: logits for token ids, whatever the format.

Each format's reader module defines an :class:`OpenedReader` (how to recognise its
directories, how to open one); :mod:`sqdeploy.formats.readers` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

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
class OpenedReader:
    kind: str
    detect: Callable[[Path], bool]
    open: Callable[[Path, str], OpenedModel]
