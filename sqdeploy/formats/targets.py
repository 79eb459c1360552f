"""Export targets: writers that turn a QuantizedModel directory into a deployable artifact.

Every target reads only the QuantizedModel (and the family record), so any target can
be produced from an existing quantized directory without recalibrating. A target
registers itself with :func:`register_target`; ``sq-export --target NAME`` finds it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sqdeploy.core.errors import SqDeployError


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


TARGETS: dict[str, Target] = {}

# modules that register targets on import (kept explicit: a broken target must fail loudly)
TARGET_MODULES: list[str] = ["sqdeploy.formats.onnx", "sqdeploy.formats.trtllm"]


def register_target(target: Target) -> None:
    TARGETS[target.name] = target


def load_targets() -> dict[str, Target]:
    for module in TARGET_MODULES:
        __import__(module)
    return TARGETS


def get_target(name: str) -> Target:
    targets = load_targets()
    if name not in targets:
        raise SqDeployError(f"unknown target '{name}'; available: quantized, {', '.join(sorted(targets))}")
    return targets[name]
