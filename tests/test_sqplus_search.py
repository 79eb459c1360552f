"""SmoothQuant+'s alpha search: round-to-nearest ranks every alpha, the final rounding picks among the best."""

from __future__ import annotations

from sqdeploy.exporter.pipeline import Calibration, Runtime, quantize_in_memory
from sqdeploy.exporter.recipes import parse_recipe


def _recipe(refine: int):
    spec = {
        "name": f"sqplus-refine{refine}",
        "scheme": {"weight": {"bits": 4, "granularity": "group", "group_size": 32, "symmetric": False}},
        "algorithm": {"name": "smoothquant_plus", "alpha": "auto", "grid": [0.0, 0.25, 0.5, 0.75, 1.0],
                      "search_samples": 4, "rounding": "gptq", "search_refine": refine},
    }
    return parse_recipe(spec, origin=spec["name"])


def test_two_stage_search_refines_the_rtn_finalists(tiny_models, calib_file):
    cal = Calibration(str(calib_file), 4, 64)
    _, two = quantize_in_memory(tiny_models["llama"], _recipe(2), cal, Runtime(progress=False))
    _, full = quantize_in_memory(tiny_models["llama"], _recipe(0), cal, Runtime(progress=False))
    s2, s0 = two.search, full.search
    assert s2["rounding"] == "rtn" and s0["rounding"] == "gptq"
    assert set(s2["rtn"]["loss"]) == {0.0, 0.25, 0.5, 0.75, 1.0}
    rtn_best_two = sorted(s2["rtn"]["loss"], key=s2["rtn"]["loss"].get)[:2]
    assert sorted(s2["finalists"]) == sorted(rtn_best_two)
    assert s2["alpha"] in s2["finalists"] and set(s2["loss"]) == set(s2["finalists"])
    # the finalists' GPTQ losses are the ones the one-stage search computes for those alphas
    for a in s2["finalists"]:
        assert abs(s2["loss"][a] - s0["loss"][a]) <= 1e-6 * max(1.0, s0["loss"][a])
    assert s2["alpha"] == min(s2["finalists"], key=s0["loss"].get)
