"""What an algorithm is to the pipeline: a typed config (the keys of its recipe section) and
a factory for the layer algorithm, plus an optional whole-model search run before the layers.

Each algorithm module (``rtn.py``, ``smoothquant.py``, ...) defines its frozen config, whose
field defaults are the only place those defaults are written, and an :class:`Algorithm`
record; :mod:`.registry` lists the records. A recipe's algorithm section is parsed into the
config by :func:`parse_config`: unknown keys and wrong types are refused there, so the
pipeline only ever sees valid settings.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, fields
from typing import Any, Callable, Literal, Union

import torch

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families.base import ModelConfig, SmoothGroup
from sqdeploy.core.schemes import QuantScheme
from sqdeploy.model.loading import TensorSource
from sqdeploy.quantize.streaming import LayerAlgorithm


@dataclass(frozen=True)
class AlgorithmConfig:
    """How the final weights round; every quantizing algorithm's config extends this."""

    rounding: Literal["rtn", "gptq"] = "rtn"
    gptq_damp: float = 0.01
    act_scale_search: bool = False
    gptq_act_aware: bool = False
    gptq_quantized_inputs: bool = False
    gptq_act_order: bool = False

    def params(self) -> dict[str, Any]:
        """The recipe section as a dict: the algorithm's own keys first, then the rounding keys
        (the order every written recipe has always had)."""
        shared = [f.name for f in fields(AlgorithmConfig)]
        own = [f.name for f in fields(self) if f.name not in shared]
        return {k: getattr(self, k) for k in own + shared}

    def check(self, origin: str, name: str, scheme: QuantScheme) -> None:
        """Refuse settings that only mean something together (the GPTQ options), so none is silently ignored."""
        if self.gptq_act_aware and (self.rounding != "gptq" or scheme.act.kind == "none"):
            raise SqDeployError(f"{origin}: gptq_act_aware needs rounding: gptq and quantized activations (scheme.act)")
        if self.gptq_act_order and self.rounding != "gptq":
            raise SqDeployError(f"{origin}: gptq_act_order needs rounding: gptq")
        if self.gptq_quantized_inputs and not self.gptq_act_aware:
            raise SqDeployError(f"{origin}: gptq_quantized_inputs needs gptq_act_aware: true")


@dataclass(frozen=True)
class SearchInputs:
    """What a whole-model search reads: the float model, the calibration ids and where to run."""

    src: TensorSource
    ids: torch.Tensor
    scheme: QuantScheme
    groups: tuple[SmoothGroup, ...]
    device: str = "cpu"
    batch: int = 8
    progress: bool = True


# (config, scheme, model config, smoothing groups) -> the layer algorithm streamed over the model
Build = Callable[[Any, QuantScheme, ModelConfig, "tuple[SmoothGroup, ...]"], LayerAlgorithm]
# (config, inputs) -> (the config with the search's choices filled in, the search's report), or None: no search
ModelSearch = Callable[[Any, SearchInputs], "tuple[Any, dict] | None"]


@dataclass(frozen=True)
class Algorithm:
    """One registered algorithm: the ``algorithm.name`` of a recipe and how to run it."""

    name: str
    config: type  # a frozen dataclass: the recipe section's keys, with their defaults
    build: Build
    model_search: ModelSearch | None = None  # runs once before the layers (e.g. SmoothQuant+'s alpha search)
    quantizes: bool = True  # False: layers pass through in float, no calibration is read


def parse_config(cls: type, given: dict[str, Any], where: str) -> Any:
    """``cls`` from a recipe's algorithm section; ``where`` names the section in errors."""
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise SqDeployError(f"recipe {where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in given.items():
        if not _matches(value, hints[key]):
            raise SqDeployError(f"recipe {where}: {key} must be {_describe(hints[key])}, got {value!r}")
        values[key] = _frozen(value, hints[key])
    return cls(**values)


def _frozen(value: Any, tp: Any) -> Any:
    """Sequences become tuples (a YAML list and its JSON round trip then compare equal)."""
    if isinstance(value, list) and any(typing.get_origin(t) is tuple for t in _alternatives(tp)):
        return tuple(value)
    return value


def _alternatives(tp: Any) -> tuple:
    return typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, t) for t in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple:
        args = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        kt, vt = typing.get_args(tp)
        return isinstance(value, dict) and all(_matches(k, kt) and _matches(v, vt) for k, v in value.items())
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(t) for t in typing.get_args(tp))
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))
