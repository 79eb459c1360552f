"""Recipes: YAML files that map one to one onto a scheme and an algorithm's settings.

A recipe is found by name among the recipes shipped with the package, or read from a
path. Its algorithm section is parsed into that algorithm's typed config (see
:mod:`.algorithm`): unknown keys are rejected with the allowed ones, so a typo never
silently falls back to a default, and a value of the wrong type names the type it must have. The *resolved* recipe (defaults filled in, searched alphas) is
written into every artifact.
"""

from __future__ import annotations

import importlib.resources
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.schemes import ActScheme, QuantScheme, WeightScheme, preset
from sqdeploy.quantize import registry
from sqdeploy.quantize.algorithm import parse_config

TOP_KEYS = {"name", "description", "scheme", "algorithm", "smoothing_groups", "calibration", "dtype"}
CALIB_KEYS = {"source": "humaneval", "samples": 128, "seq_len": 512}


@dataclass(frozen=True)
class Recipe:
    name: str
    scheme: QuantScheme
    algorithm: str
    config: Any = field(hash=False)  # the frozen config of the registered algorithm named above (see .registry)
    smoothing_groups: tuple[str, ...] | str | None = None  # None: every group the family declares; "norms": norm -> linear groups
    calibration: dict[str, Any] = field(default_factory=lambda: dict(CALIB_KEYS), hash=False)
    dtype: str = "auto"  # storage dtype of float tensors: auto (the model's), float16, bfloat16, float32
    description: str = ""

    @property
    def params(self) -> dict[str, Any]:
        """The algorithm's settings as the recipe file writes them."""
        return self.config.params()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "scheme": self.scheme.to_dict(),
            "algorithm": {"name": self.algorithm, **self.params},
            "smoothing_groups": "all" if self.smoothing_groups is None else (
                self.smoothing_groups if isinstance(self.smoothing_groups, str) else list(self.smoothing_groups)),
            "calibration": dict(self.calibration),
            "dtype": self.dtype,
        }


def _reject_unknown(section: str, given: dict, allowed) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise SqDeployError(f"recipe {section}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _scheme(spec: Any) -> QuantScheme:
    if spec is None or spec == "float":
        return QuantScheme(weight=None)
    if isinstance(spec, str):
        return preset(spec)
    if not isinstance(spec, dict):
        raise SqDeployError("recipe scheme: expected a preset name or a mapping with 'weight' and 'act'")
    _reject_unknown("scheme", spec, {"weight", "act"})
    w = spec.get("weight")
    if w is not None:
        _reject_unknown("scheme.weight", w, {"bits", "granularity", "group_size", "symmetric"})
    a = spec.get("act") or {}
    _reject_unknown("scheme.act", a, {"kind", "bits"})
    return QuantScheme(weight=WeightScheme(**w) if w else None, act=ActScheme(**a))


def parse_recipe(data: dict[str, Any], origin: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise SqDeployError(f"{origin}: a recipe is a YAML mapping")
    _reject_unknown(origin, data, TOP_KEYS)
    algo = data.get("algorithm") or {"name": "rtn"}
    if isinstance(algo, str):
        algo = {"name": algo}
    name = algo.get("name")
    handler = registry.get(name, origin)
    config = parse_config(handler.config, {k: v for k, v in algo.items() if k != "name"}, f"{origin} algorithm '{name}'")
    calib = dict(data.get("calibration") or {})
    _reject_unknown(f"{origin} calibration", calib, CALIB_KEYS)
    groups = data.get("smoothing_groups", "all")
    scheme = _scheme(data.get("scheme"))
    if scheme.is_float and handler.quantizes:
        raise SqDeployError(f"{origin}: algorithm '{name}' needs a quantization scheme")
    config.check(origin, name, scheme)
    dtype = data.get("dtype", "auto")
    if dtype not in ("auto", "float16", "bfloat16", "float32"):
        raise SqDeployError(f"{origin}: dtype must be auto, float16, bfloat16 or float32, got {dtype!r}")
    return Recipe(
        name=str(data.get("name") or origin),
        description=str(data.get("description", "")),
        scheme=scheme,
        algorithm=name,
        config=config,
        smoothing_groups=None if groups in ("all", None) else groups if groups == "norms" else tuple(groups),
        calibration={**CALIB_KEYS, **calib},
        dtype=dtype,
    )


def _recipe_dir() -> Path:
    """``sqdeploy.recipes`` in an installed wheel; the checkout's ``recipes/`` when run from source."""
    try:
        return Path(str(importlib.resources.files("sqdeploy.recipes")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "recipes"


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(_recipe_dir().glob("*.yaml"))}


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A recipe by name or path; ``name:key=value[:key=value...]`` overrides a built-in recipe's algorithm
    keys (or ``smoothing_groups``) with JSON values, e.g. ``w8a8-sq:alpha=0.5`` or ``w8a8-sq:alpha=null``."""
    path = Path(name_or_path)
    builtin = builtin_recipes()
    name, *overrides = str(name_or_path).split(":")
    if overrides and name in builtin and not path.exists():
        return _with_overrides(load_recipe(name), str(name_or_path), overrides)
    if str(name_or_path) in builtin:
        path = builtin[str(name_or_path)]
    elif not path.exists():
        raise SqDeployError(f"unknown recipe '{name_or_path}'; built-in recipes: {', '.join(sorted(builtin))} (or a YAML path)")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SqDeployError(f"recipe {path} is unreadable ({exc})") from None
    return parse_recipe(data, origin=path.stem)


def _with_overrides(base: Recipe, spec: str, overrides: list[str]) -> Recipe:
    data = base.to_dict()
    algo = dict(data["algorithm"])
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SqDeployError(f"recipe '{spec}': an override is key=value, got '{item}'")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value  # a bare word: rtn, gptq, search
        if key == "smoothing_groups":
            data[key] = parsed
        else:
            algo[key] = parsed
    return parse_recipe({**data, "name": spec, "algorithm": algo}, origin=spec)
