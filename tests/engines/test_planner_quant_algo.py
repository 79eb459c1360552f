"""The memory planner counts what the TensorRT-LLM writer writes: for every shipped recipe,
the planner's quant_algo (and KV cache algorithm) is the writer's, and the planner refuses
exactly the recipes the writer refuses."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families import family_for_hf_config
from sqdeploy.engines.model_shape import quantization_for_scheme
from sqdeploy.formats.trtllm.writer import resolve
from sqdeploy.quantize.recipes import load_recipe

RECIPES = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
CONFIG = json.loads((Path(__file__).resolve().parents[1] / "data" / "codellama-34b.config.json").read_text())


def _writer(recipe: str, kv: str | None) -> dict | SqDeployError:
    r = load_recipe(recipe)
    family = family_for_hf_config(CONFIG)
    args = argparse.Namespace(kv_cache=kv, tp=1, pp=1, int4_zero_point=False)
    try:
        return resolve((r, family.config_from_hf(CONFIG), family), args).to_config()
    except SqDeployError as exc:
        return exc


def _planner(recipe: str, kv: str | None) -> dict | SqDeployError:
    try:
        return quantization_for_scheme(load_recipe(recipe).scheme, None if kv is None else kv.upper())
    except SqDeployError as exc:
        return exc


def test_every_shipped_recipe_is_covered():
    assert {"w8a8-sq-o1", "w8a8-sq-o3", "w8a8-sq-pertoken", "w4a16-awq", "fp16"} <= set(RECIPES)


@pytest.mark.parametrize("kv", [None, "int8"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_planner_quant_algo_is_the_writers(recipe, kv):
    written, planned = _writer(recipe, kv), _planner(recipe, kv)
    if isinstance(written, SqDeployError):
        if "needs calibrated K/V ranges" in str(written):  # a property of the recipe's calibration, not its layout
            return
        assert isinstance(planned, SqDeployError), f"{recipe}: the writer refuses ({written}) but the planner plans {planned}"
        return
    assert not isinstance(planned, SqDeployError), f"{recipe}: the planner refuses ({planned}) what the writer writes"
    assert planned["quant_algo"] == written["quant_algo"]
    assert planned["kv_cache_quant_algo"] == written["kv_cache_quant_algo"]
    assert planned == written  # group size, zero point, pre-quant scale and exclusions too


def test_o1_and_o3_plan_per_channel_layouts():
    """Per-tensor INT8 weights are written broadcast per channel, and the plan counts that layout."""
    assert _planner("w8a8-sq-o1", None)["quant_algo"] == "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
    assert _planner("w8a8-sq-o3", None)["quant_algo"] == "W8A8_SQ_PER_CHANNEL"
