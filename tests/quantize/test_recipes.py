"""Recipes: every built-in parses; typos are errors that list the allowed keys."""

import pytest

from sqdeploy.core.errors import SqDeployError
from sqdeploy.quantize.recipes import builtin_recipes, load_recipe, parse_recipe

REQUIRED = {"fp16", "w8a8-sq", "w8a8-sq-pertoken", "w8a16-rtn", "w4a16-rtn", "w4a16-awq", "w4a16-sqplus"}


def test_required_recipes_ship():
    assert REQUIRED <= set(builtin_recipes())


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_builtin_recipe_parses_and_round_trips(name):
    r = load_recipe(name)
    assert r.name == name
    again = parse_recipe(r.to_dict(), origin=name)
    assert again.scheme == r.scheme and again.algorithm == r.algorithm and again.params == r.params


def test_recipe_schemes():
    assert load_recipe("w8a8-sq").scheme.act.kind == "static_tensor"
    assert load_recipe("w8a8-sq-pertoken").scheme.act.kind == "dynamic_token"
    w4 = load_recipe("w4a16-sqplus").scheme.weight
    assert (w4.bits, w4.group_size, w4.symmetric) == (4, 128, False)


def test_unknown_recipe_lists_builtins():
    with pytest.raises(SqDeployError, match="w4a16-awq"):
        load_recipe("w4a16-nope")


def test_unknown_keys_rejected_with_allowed_ones():
    with pytest.raises(SqDeployError, match="allowed: .*alpha"):
        parse_recipe({"scheme": "O3", "algorithm": {"name": "smoothquant", "alfa": 0.5}})
    with pytest.raises(SqDeployError, match="unknown key"):
        parse_recipe({"scheme": "O3", "algorithm": "rtn", "extra": 1})
    with pytest.raises(SqDeployError, match="group_size"):
        parse_recipe({"scheme": {"weight": {"bits": 4, "granularity": "group", "group_size": 100}}, "algorithm": "rtn"})


def test_gptq_options_that_would_be_ignored_are_refused():
    w8a16 = {"weight": {"bits": 8, "granularity": "channel"}}
    with pytest.raises(SqDeployError, match="gptq_act_aware needs rounding: gptq"):
        parse_recipe({"scheme": "O3", "algorithm": {"name": "rtn", "gptq_act_aware": True}})
    with pytest.raises(SqDeployError, match="quantized activations"):
        parse_recipe({"scheme": w8a16, "algorithm": {"name": "rtn", "rounding": "gptq", "gptq_act_aware": True}})
    with pytest.raises(SqDeployError, match="gptq_quantized_inputs needs gptq_act_aware"):
        parse_recipe({"scheme": "O3", "algorithm": {"name": "rtn", "rounding": "gptq", "gptq_quantized_inputs": True}})
    with pytest.raises(SqDeployError, match="gptq_act_order needs rounding: gptq"):
        parse_recipe({"scheme": "O3", "algorithm": {"name": "rtn", "gptq_act_order": True}})
    ok = parse_recipe({"scheme": "O3", "algorithm": {"name": "smoothquant", "rounding": "gptq", "gptq_act_aware": True,
                                                     "gptq_quantized_inputs": True}})
    assert ok.params["gptq_act_aware"] and ok.params["gptq_quantized_inputs"]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_norms_selects_the_norm_groups_of_any_family(family, tiny_models):
    from sqdeploy.model import HFCheckpoint
    from sqdeploy.quantize.pipeline import smoothing_groups

    ck = HFCheckpoint(tiny_models[family])
    fam, cfg = ck.family, ck.config
    groups = smoothing_groups(load_recipe("w8a8-sq-pertoken:smoothing_groups=norms"), fam, cfg)
    assert [g.name for g in groups] == [g.name for g in fam.smoothing_groups if g.kind == "norm"]
    assert len(groups) == 2 and all(g.kind == "norm" for g in groups)
    assert len(smoothing_groups(load_recipe("w8a8-sq"), fam, cfg)) == 4
