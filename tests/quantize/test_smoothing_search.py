"""The whole-model smoothing search: s = 1 is always a candidate, injected outliers get smoothed,
and a too-small calibration set is refused (the outlier model is in conftest.py)."""

from __future__ import annotations

import pytest
import torch

from sqdeploy.core.errors import SqDeployError
from sqdeploy.quantize import smoothing_search
from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize_in_memory
from sqdeploy.quantize.recipes import load_recipe, parse_recipe


def _static_search(**algo):
    return parse_recipe({
        "name": "static-search",
        "scheme": {"weight": {"bits": 8, "granularity": "channel"}, "act": {"kind": "static_tensor"}},
        "algorithm": {"name": "smoothquant", "alpha": "search", "grid": [0.5], "search_groups": False,
                      "search_holdout": 2, "search_samples": 6, **algo},
    })


def test_injected_outliers_are_smoothed(outlier_model, calib_file):
    _, result = quantize_in_memory(outlier_model, _static_search(), Calibration(str(calib_file), 10, 32), Runtime(progress=False))
    search = result.search
    off = smoothing_search.plan_name(result.family.smoothing_groups, (None,) * 4)
    assert off in search["scores"]  # s = 1 was scored ...
    assert search["plan"]["attn_norm->q/k/v"] == 0.5 and search["plan"]["mlp_norm->gate/up"] == 0.5  # ... and lost
    assert search["chosen"]["kl"] < search["unsmoothed"]["kl"]
    assert search["calibration"] == {"statistics": 6, "held_apart": 2, "seq_len": 32}
    assert result.recipe.params["alpha"] == search["plan"]  # the resolved recipe states the plan applied
    assert all(layer.result.info["alpha"] == search["plan"] for layer in result.layers)


def test_unsmoothed_plan_is_in_every_stage_that_picks(monkeypatch, tiny_models, calib_file):
    """Whatever the scores, s = 1 competes in the uniform, per-group, combined and refine stages, and
    wins when every smoothed plan scores worse."""
    seen = []

    def fake_score(src, stats_ids, held_ids, plans, *args, **kwargs):
        seen.append(list(plans))
        return {p: {"kl": 1.0 if all(a is None for a in p) else 2.0 + sum(a or 0 for a in p), "nll": 0.0} for p in plans}

    monkeypatch.setattr(smoothing_search, "_score_plans", fake_score)
    rec = _static_search(grid=[0.3, 0.6], search_groups=True, rounding="gptq", search_refine=2)
    _, result = quantize_in_memory(tiny_models["llama"], rec, Calibration(str(calib_file), 10, 32), Runtime(progress=False))
    search = result.search
    assert all(a is None for a in search["plan"].values())
    off = (None,) * 4
    assert off in seen[0] and off in seen[-1]  # the uniform stage and the GPTQ refine stage
    assert search["rtn_scores"] is not None and len(search["scores"]) == 3  # 2 finalists + s = 1


def test_small_calibration_falls_back_and_says_so():
    ids = torch.arange(6 * 8).view(6, 8)
    stats, held, note = smoothing_search.split_calibration(ids, smoothing_search.SearchSettings(holdout=2))
    assert note is None and held.shape[0] == 2 and stats.shape[0] == 4  # the full split: 2 + 4
    ids = ids[:5]
    stats, held, note = smoothing_search.split_calibration(ids, smoothing_search.SearchSettings(holdout=8))
    assert held.shape[0] == 1 and stats.shape[0] == 4  # a quarter held apart
    assert "fewer than the 12 of the search's split" in note
    assert not set(held[:, 0].tolist()) & set(stats[:, 0].tolist())


def test_gptq_that_does_not_carry_over_falls_back_to_round_to_nearest(monkeypatch, tiny_models, calib_file):
    """When every GPTQ-rounded finalist scores worse on the held-apart sequences than a plan rounded to
    nearest, the export rounds to nearest and its resolved recipe says so."""
    def fake_score(src, stats_ids, held_ids, plans, scheme, groups, rounding, *args, **kwargs):
        worse = 10.0 if rounding.method == "gptq" else 0.0
        return {p: {"kl": worse + 1.0 + sum(a or 0 for a in p), "nll": 0.0} for p in plans}

    monkeypatch.setattr(smoothing_search, "_score_plans", fake_score)
    rec = _static_search(grid=[0.3, 0.6], rounding="gptq", gptq_act_order=True, search_refine=2)
    _, result = quantize_in_memory(tiny_models["llama"], rec, Calibration(str(calib_file), 10, 32), Runtime(progress=False))
    assert result.search["rounding"] == "rtn" and result.recipe.params["rounding"] == "rtn"
    assert result.recipe.params["gptq_act_order"] is False


def test_too_small_calibration_names_the_minimum(tiny_models, calib_file):
    with pytest.raises(SqDeployError, match="at least 2 calibration sequences"):
        quantize_in_memory(tiny_models["llama"], _static_search(), Calibration(str(calib_file), 1, 32), Runtime(progress=False))


def test_overrides_parse():
    assert load_recipe("w8a8-sq:alpha=null").params["alpha"] is None
    assert load_recipe("w8a8-sq:alpha=0.5:rounding=rtn:gptq_act_order=false").params["rounding"] == "rtn"
    with pytest.raises(SqDeployError, match="alpha must be"):
        load_recipe("w8a8-sq:alpha=1.5")
