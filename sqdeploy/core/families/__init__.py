"""The model-family registry: the only place that maps HF architectures to families."""

from __future__ import annotations

from typing import Any, Mapping

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families.base import Family, ModelConfig, SmoothGroup, TrtllmLayout, TrtllmModule
from sqdeploy.core.families.llama import LLAMA, MISTRAL
from sqdeploy.core.families.opt import OPT
from sqdeploy.core.families.qwen2 import QWEN2

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, MISTRAL, QWEN2, OPT)}
_BY_ARCH = {arch: f for f in FAMILIES.values() for arch in f.architectures}


def supported_architectures() -> list[str]:
    return sorted(_BY_ARCH)


def family_for_hf_config(cfg: Mapping[str, Any]) -> Family:
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in _BY_ARCH:
            return _BY_ARCH[arch]
    by_type = {f.name: f for f in FAMILIES.values()}
    if not archs and cfg.get("model_type") in by_type:
        return by_type[cfg["model_type"]]
    got = ", ".join(archs) or f"model_type={cfg.get('model_type')!r}"
    raise SqDeployError(
        f"unsupported architecture {got}; supported: {', '.join(supported_architectures())}"
    )


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise SqDeployError(f"unknown family '{name}'; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


__all__ = ["Family", "ModelConfig", "SmoothGroup", "TrtllmLayout", "TrtllmModule", "FAMILIES", "family_for_hf_config", "get_family", "supported_architectures"]
