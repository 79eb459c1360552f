"""What an export target provides: its options, its writer, and a precheck that refuses an
impossible request before any quantization work starts.

Every target reads only the quantized model (and the family record), so any target can be
produced from an existing quantized directory without recalibrating.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Target:
    name: str
    help: str
    # add target-specific CLI options (e.g. --tp, --int4-format)
    add_arguments: Callable[[argparse.ArgumentParser], None]
    # write the artifact from a QuantizedModel directory into out (an empty temporary dir)
    write: Callable[[Path, Path, argparse.Namespace], dict]
    # refuse impossible requests before any quantization work starts
    precheck: Callable[[object, argparse.Namespace], None] = lambda recipe_and_config, args: None
