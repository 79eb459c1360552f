"""The algorithm registry: recipes resolve to typed configs, bad settings are one-line errors, and an
algorithm registered from outside the package runs through the pipeline unchanged."""

from __future__ import annotations

from dataclasses import dataclass, fields

import pytest
import torch

from sqdeploy.core.errors import SqDeployError
from sqdeploy.quantize import registry
from sqdeploy.quantize.algorithm import Algorithm, AlgorithmConfig, SearchInputs
from sqdeploy.quantize.recipes import builtin_recipes, load_recipe, parse_recipe
from sqdeploy.quantize.rtn import RTN, Rounding

SHIPPED = {"none", "rtn", "smoothquant", "smoothquant_plus", "awq"}


def test_every_shipped_algorithm_is_registered():
    assert set(registry.names()) == SHIPPED


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_shipped_recipe_resolves_to_its_registered_config(name):
    r = load_recipe(name)
    cls = registry.get(r.algorithm).config
    assert type(r.config) is cls
    # the written recipe holds every key of the config, and nothing else
    assert set(r.to_dict()["algorithm"]) == {"name"} | {f.name for f in fields(cls)}
    assert parse_recipe(r.to_dict(), origin=name).config == r.config


def test_defaults_come_from_the_config():
    for name in registry.names():
        cls = registry.get(name).config
        scheme = "float" if name == "none" else {"weight": {"bits": 8, "granularity": "channel"}}
        r = parse_recipe({"scheme": scheme, "algorithm": name})
        assert r.config == cls()


def test_unknown_key_lists_the_allowed_ones():
    with pytest.raises(SqDeployError, match=r"unknown key\(s\) alfa; allowed: .*alpha.*search_refine"):
        parse_recipe({"scheme": "O3", "algorithm": {"name": "smoothquant", "alfa": 0.5}})


@pytest.mark.parametrize("algo, key, value, expected", [
    ({"name": "awq"}, "grid", "20", "an integer"),
    ({"name": "awq"}, "clip", "yes", "true or false"),
    ({"name": "rtn"}, "gptq_damp", "0.1", "a number"),
    ({"name": "rtn"}, "rounding", "nearest", "'rtn' or 'gptq'"),
    ({"name": "smoothquant"}, "search_samples", 1.5, "an integer"),
    ({"name": "smoothquant"}, "grid", [0.1, "x"], "a list of a number"),
])
def test_wrong_type_is_a_one_line_error(algo, key, value, expected):
    with pytest.raises(SqDeployError) as info:
        parse_recipe({"name": "r", "scheme": "O3", "algorithm": {**algo, key: value}})
    msg = str(info.value)
    assert "\n" not in msg and f"{key} must be {expected}" in msg and repr(value) in msg


def test_unknown_algorithm_lists_the_registered_ones():
    with pytest.raises(SqDeployError, match="known: none, rtn, smoothquant, smoothquant_plus, awq"):
        parse_recipe({"scheme": "O3", "algorithm": "gptq"})


# ------------------------------------------------------------------ a new algorithm, from outside
@dataclass(frozen=True)
class HalfConfig(AlgorithmConfig):
    """Round to nearest after scaling every linear's weights by ``factor``; ``searched``: set by the search hook."""

    factor: float = 1.0
    search: bool = False
    searched: float | None = None


class Half:
    name = "half"
    needs_quant_stream = False
    needs_hessian = False

    def __init__(self, config: HalfConfig, scheme, cfg):
        self.config, self.rtn, self.calls = config, RTN(scheme, cfg.linears, Rounding.of(config)), []

    def quantize_layer(self, block, data):
        with torch.no_grad():
            for name in self.rtn.linears:
                block.linear(name).weight.mul_(self.config.factor)
        self.calls.append(block.index)
        result = self.rtn.quantize_layer(block, data)
        result.info["factor"] = self.config.factor
        return result


def _search(config: HalfConfig, inputs: SearchInputs):
    if not config.search:
        return None
    assert inputs.ids.shape[0] == 2 and inputs.groups  # the calibration and the family's groups reach the hook
    return HalfConfig(**{**config.__dict__, "factor": 0.5, "searched": 0.5}), {"plan": "halved"}


@pytest.fixture
def half_registered():
    built: list[Half] = []

    def build(config, scheme, cfg, groups):
        built.append(Half(config, scheme, cfg))
        return built[-1]

    registry.register(Algorithm("half", HalfConfig, build, _search))
    yield built
    registry.unregister("half")


def test_registering_twice_is_refused(half_registered):
    with pytest.raises(SqDeployError, match="already registered"):
        registry.register(registry.get("half"))


def test_registered_algorithm_runs_from_a_recipe(half_registered, tiny_models, calib_file):
    from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize

    recipe = {"name": "half", "scheme": {"weight": {"bits": 8, "granularity": "channel"}},
              "algorithm": {"name": "half", "factor": 0.25, "search": True}}
    result = quantize(tiny_models["llama"], parse_recipe(recipe), Calibration(str(calib_file), 2, 32), Runtime(progress=False))
    (half,) = half_registered
    assert half.calls == list(range(result.config.num_layers))
    assert half.config.factor == 0.5  # the search hook's choice reached the layers
    algo = result.manifest["recipe"]["algorithm"]
    assert algo["name"] == "half" and algo["factor"] == 0.5 and algo["searched"] == 0.5
    assert list(algo)[:4] == ["name", "factor", "search", "searched"]  # own keys, then the rounding keys
    assert result.manifest["alpha_search"] == {"plan": "halved"}
    assert all(layer["info"]["factor"] == 0.5 for layer in result.manifest["layers"])
    with pytest.raises(SqDeployError, match="factor must be a number"):
        parse_recipe({**recipe, "algorithm": {"name": "half", "factor": "big"}})
