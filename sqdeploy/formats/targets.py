"""The export targets ``sq-export --target NAME`` can write (besides the quantized directory itself)."""

from __future__ import annotations

from sqdeploy.core.errors import SqDeployError
from sqdeploy.formats import onnx, trtllm
from sqdeploy.formats.target import Target

TARGETS: dict[str, Target] = {t.name: t for t in (onnx.TARGET, *trtllm.TARGETS)}


def load_targets() -> dict[str, Target]:
    return TARGETS


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise SqDeployError(f"unknown target '{name}'; available: quantized, {', '.join(sorted(TARGETS))}")
    return TARGETS[name]


def target_for(options: object) -> Target:
    """The target whose options type ``options`` is."""
    for t in TARGETS.values():
        if type(options) is t.options:
            return t
    known = ", ".join(t.options.__name__ for t in TARGETS.values())
    raise SqDeployError(f"{type(options).__name__} is no target's options; pass one of {known}")
