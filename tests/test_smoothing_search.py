"""The whole-model smoothing search: s = 1 is always a candidate, injected outliers get smoothed,
a too-small calibration set is refused, and AWQ's scales beat round-to-nearest on such outliers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from sqdeploy.core.errors import SqDeployError
from sqdeploy.model import HFCheckpoint, load_model
from sqdeploy.quantize import smoothing_search
from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize_in_memory
from sqdeploy.quantize.recipes import load_recipe, parse_recipe

OUTLIER_CHANNELS = (3, 17, 40, 77)
OUTLIER_GAIN = 40.0


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory, tiny_models):
    """The tiny Llama with a few norm output channels made 40x larger and the consumers' weight columns
    40x smaller: the same function, with the activation outliers smoothing exists for."""
    src = tiny_models["llama"]
    out = tmp_path_factory.mktemp("outliers") / "llama"
    out.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    ch = list(OUTLIER_CHANNELS)
    for key in list(tensors):
        for norm, consumers in (("input_layernorm", ("q_proj", "k_proj", "v_proj")),
                                ("post_attention_layernorm", ("gate_proj", "up_proj"))):
            if key.endswith(f"{norm}.weight"):
                prefix = key[: -len(f"{norm}.weight")]
                tensors[key] = tensors[key].clone()
                tensors[key][ch] *= OUTLIER_GAIN
                for c in consumers:
                    name = f"{prefix}{'self_attn' if c[0] in 'qkv' else 'mlp'}.{c}.weight"
                    tensors[name] = tensors[name].clone()
                    tensors[name][:, ch] /= OUTLIER_GAIN
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


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


def _logit_error(model_dir, recipe, calib_file) -> float:
    """Relative squared error of the quantized model's logits against the float model's on calibration text."""
    ck = HFCheckpoint(model_dir)
    ids = torch.randint(10, 8000, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = load_model(ck)(ids)
    quant, _ = quantize_in_memory(ck, recipe, Calibration(str(calib_file), 8, 32), Runtime(progress=False))
    with torch.no_grad():
        return float((quant(ids) - ref).pow(2).sum() / ref.pow(2).sum())


def test_awq_beats_rtn_on_injected_outliers(outlier_model, calib_file):
    """INT4 round-to-nearest zeroes the shrunken weight columns of the outlier channels; AWQ's scales
    move their range back into the weights."""
    scheme = {"weight": {"bits": 4, "granularity": "group", "group_size": 32, "symmetric": False}}
    rtn = parse_recipe({"name": "rtn", "scheme": scheme, "algorithm": "rtn"})
    awq = parse_recipe({"name": "awq", "scheme": scheme, "algorithm": {"name": "awq", "grid": 10, "clip": False,
                                                                       "search_samples": 4}})
    e_rtn, e_awq = _logit_error(outlier_model, rtn, calib_file), _logit_error(outlier_model, awq, calib_file)
    assert e_awq < 0.5 * e_rtn
