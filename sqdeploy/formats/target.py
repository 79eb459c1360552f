"""What an export target provides: its options type, its writer, and a precheck that refuses an
impossible request before any quantization work starts.

Every target reads only the quantized model (and the family record), so any target can be
produced from an existing quantized directory without recalibrating. A target's options are a
frozen dataclass (e.g. :class:`~sqdeploy.formats.onnx.options.OnnxExportOptions`); the
command line's flags for them are defined in :mod:`sqdeploy.cli.targets`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class WriteContext:
    """What a writer knows besides its options: where the export started and how it is shown."""

    source: Path  # the model the export started from: a quantized directory or a HF model
    shown_as: Path  # the output directory's final name (the writer fills a temporary one)
    progress: bool = True
    device: str = "cpu"  # where a target that re-quantizes runs its calibration pass (the export's --device)


@dataclass(frozen=True)
class Target:
    name: str
    help: str
    options: type  # the frozen options dataclass; its defaults are the target's defaults
    # write the artifact from a QuantizedModel directory into out (an empty temporary dir)
    write: Callable[[Path, Path, Any, WriteContext], dict]
    # refuse impossible requests before any quantization work starts
    precheck: Callable[[object, Any], None] = lambda recipe_and_config, options: None
