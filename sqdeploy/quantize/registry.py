"""The algorithms a recipe can name (``algorithm: {name: ...}``).

The shipped ones are listed here explicitly; :func:`register` adds another (its module
defines a config and an :class:`~sqdeploy.quantize.algorithm.Algorithm` record), which recipes
can then name without any change to the pipeline.
"""

from __future__ import annotations

from sqdeploy.core.errors import SqDeployError
from sqdeploy.quantize import awq, passthrough, rtn, smoothquant, smoothquant_plus
from sqdeploy.quantize.algorithm import Algorithm

_ALGORITHMS: dict[str, Algorithm] = {
    a.name: a for a in (passthrough.ALGORITHM, rtn.ALGORITHM, smoothquant.ALGORITHM, smoothquant_plus.ALGORITHM, awq.ALGORITHM)
}


def register(algorithm: Algorithm, replace: bool = False) -> Algorithm:
    """Make ``algorithm`` available to recipes; refuses to shadow a registered name unless ``replace``."""
    if algorithm.name in _ALGORITHMS and not replace:
        raise SqDeployError(f"algorithm '{algorithm.name}' is already registered; pick another name")
    _ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def unregister(name: str) -> None:
    _ALGORITHMS.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(_ALGORITHMS)


def get(name: str, origin: str = "recipe") -> Algorithm:
    if name not in _ALGORITHMS:
        raise SqDeployError(f"{origin}: unknown algorithm {name!r}; known: {', '.join(_ALGORITHMS)}")
    return _ALGORITHMS[name]
