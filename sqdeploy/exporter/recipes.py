"""Recipes: YAML files that map one to one onto a scheme and an algorithm's settings.

A recipe is found by name among the recipes shipped with the package, or read from a
path. Unknown keys are rejected with the allowed ones, so a typo never silently falls
back to a default. The *resolved* recipe (defaults filled in, searched alphas) is
written into every artifact.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import SqDeployError
from .schemes import ActScheme, QuantScheme, WeightScheme, preset

# algorithm -> the parameters its recipe section may set, with defaults
ALGORITHM_PARAMS: dict[str, dict[str, Any]] = {
    "none": {},
    "rtn": {},
    "smoothquant": {"alpha": 0.5, "grid": None, "search_samples": 16, "search_refine": 0},
    "smoothquant_plus": {"alpha": "auto", "grid": None, "search_samples": 32, "search_refine": 3},
    "awq": {
        "grid": 20, "duo_scaling": True, "clip": True, "clip_grid": 20, "max_shrink": 0.5,
        "search_samples": 16, "clip_tokens": 512,
    },
}
# how the final weights round, for every algorithm that quantizes
ROUNDING_PARAMS = {"rounding": "rtn", "gptq_damp": 0.01, "act_scale_search": False, "gptq_act_aware": False,
                   "gptq_quantized_inputs": False, "gptq_act_order": False}
for _name, _params in ALGORITHM_PARAMS.items():
    if _name != "none":
        _params.update(ROUNDING_PARAMS)
TOP_KEYS = {"name", "description", "scheme", "algorithm", "smoothing_groups", "calibration", "dtype"}
CALIB_KEYS = {"source": "humaneval", "samples": 128, "seq_len": 512}


@dataclass(frozen=True)
class Recipe:
    name: str
    scheme: QuantScheme
    algorithm: str
    params: dict[str, Any] = field(default_factory=dict, hash=False)
    smoothing_groups: tuple[str, ...] | str | None = None  # None: every group the family declares; "norms": norm -> linear groups
    calibration: dict[str, Any] = field(default_factory=lambda: dict(CALIB_KEYS), hash=False)
    dtype: str = "auto"  # storage dtype of float tensors: auto (the model's), float16, bfloat16, float32
    description: str = ""

    @property
    def needs_calibration(self) -> bool:
        return self.algorithm not in ("none", "rtn") or self.scheme.act.static

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


def _check_rounding(origin: str, params: dict[str, Any], scheme: QuantScheme) -> None:
    """The GPTQ options only mean something together: refuse a recipe that would silently ignore one."""
    if params["gptq_act_aware"] and (params["rounding"] != "gptq" or scheme.act.kind == "none"):
        raise SqDeployError(f"{origin}: gptq_act_aware needs rounding: gptq and quantized activations (scheme.act)")
    if params["gptq_act_order"] and params["rounding"] != "gptq":
        raise SqDeployError(f"{origin}: gptq_act_order needs rounding: gptq")
    if params["gptq_quantized_inputs"] and not params["gptq_act_aware"]:
        raise SqDeployError(f"{origin}: gptq_quantized_inputs needs gptq_act_aware: true")


def parse_recipe(data: dict[str, Any], origin: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise SqDeployError(f"{origin}: a recipe is a YAML mapping")
    _reject_unknown(origin, data, TOP_KEYS)
    algo = data.get("algorithm") or {"name": "rtn"}
    if isinstance(algo, str):
        algo = {"name": algo}
    name = algo.get("name")
    if name not in ALGORITHM_PARAMS:
        raise SqDeployError(f"{origin}: unknown algorithm {name!r}; known: {', '.join(ALGORITHM_PARAMS)}")
    params = {k: v for k, v in algo.items() if k != "name"}
    _reject_unknown(f"{origin} algorithm '{name}'", params, ALGORITHM_PARAMS[name])
    params = {**ALGORITHM_PARAMS[name], **params}
    calib = dict(data.get("calibration") or {})
    _reject_unknown(f"{origin} calibration", calib, CALIB_KEYS)
    groups = data.get("smoothing_groups", "all")
    scheme = _scheme(data.get("scheme"))
    if scheme.is_float and name != "none":
        raise SqDeployError(f"{origin}: algorithm '{name}' needs a quantization scheme")
    if name != "none":
        _check_rounding(origin, params, scheme)
    dtype = data.get("dtype", "auto")
    if dtype not in ("auto", "float16", "bfloat16", "float32"):
        raise SqDeployError(f"{origin}: dtype must be auto, float16, bfloat16 or float32, got {dtype!r}")
    return Recipe(
        name=str(data.get("name") or origin),
        description=str(data.get("description", "")),
        scheme=scheme,
        algorithm=name,
        params=params,
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
    path = Path(name_or_path)
    builtin = builtin_recipes()
    if str(name_or_path) in builtin:
        path = builtin[str(name_or_path)]
    elif not path.exists():
        raise SqDeployError(f"unknown recipe '{name_or_path}'; built-in recipes: {', '.join(sorted(builtin))} (or a YAML path)")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SqDeployError(f"recipe {path} is unreadable ({exc})") from None
    return parse_recipe(data, origin=path.stem)
