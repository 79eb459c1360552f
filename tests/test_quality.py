"""Quality on the real shared model (loose bounds; the README's figures come from ``sq-eval`` on 24 windows).

A small calibration set and a few windows keep this fast; the assertions are chosen so
that a broken algorithm fails them: SmoothQuant must clearly beat unsmoothed static
W8A8 on this model's activation outliers, and INT4 must stay near float.
"""

import pytest

from sqdeploy.exporter.evaluate import eval_windows, model_logits_fn, perplexity, read_text
from sqdeploy.exporter.pipeline import Calibration, Runtime, load_tokenizer, quantize_in_memory
from sqdeploy.exporter.recipes import load_recipe, parse_recipe
from sqdeploy.model import HFCheckpoint, load_model

from .conftest import HELDOUT, HUMANEVAL

CAL = Calibration(str(HUMANEVAL), 8, 256)


@pytest.fixture(scope="module")
def setup(shared_model):
    ck = HFCheckpoint(shared_model)
    windows = eval_windows(load_tokenizer(ck.path), read_text(HELDOUT), 24, 512)[::4]  # 6 of the 24 standard windows
    base = perplexity(model_logits_fn(load_model(ck)), windows).ppl
    return ck, windows, base


def _ppl(setup, recipe, cal=CAL):
    ck, windows, _ = setup
    model, result = quantize_in_memory(ck, recipe, cal, Runtime(progress=False))
    return perplexity(model_logits_fn(model), windows).ppl, result


def _static_w8a8(alpha):
    return parse_recipe({
        "name": f"static-{alpha}",
        "scheme": {"weight": {"bits": 8, "granularity": "channel"}, "act": {"kind": "static_tensor"}},
        "algorithm": {"name": "smoothquant", "alpha": alpha} if alpha is not None else "rtn",
    })


def test_smoothquant_fixes_static_w8a8_outliers(setup):
    _, _, base = setup
    plain, _ = _ppl(setup, _static_w8a8(None))
    smooth, _ = _ppl(setup, _static_w8a8(0.5))
    assert plain > base * 1.02  # the outliers hurt without smoothing ...
    assert smooth < base * 1.012  # ... and smoothing removes most of the loss
    assert (plain - base) > 2 * (smooth - base)


def test_int4_recipes_stay_near_float(setup):
    _, _, base = setup
    rtn, _ = _ppl(setup, "w4a16-rtn")
    sqplus_rec = parse_recipe({**load_recipe("w4a16-sqplus").to_dict(), "algorithm": {
        "name": "smoothquant_plus", "alpha": "auto", "grid": [0.0, 0.35], "search_samples": 4,
        "rounding": "gptq", "gptq_damp": 0.01}})
    sqplus, result = _ppl(setup, sqplus_rec, Calibration(str(HUMANEVAL), 32, 256))  # GPTQ needs more tokens than 8 x 256
    assert base < rtn < base * 1.03
    assert sqplus < rtn  # smoothing + GPTQ beats round-to-nearest
    search = result.search
    assert set(search["loss"]) == {0.0, 0.35} and search["alpha"] == min(search["loss"], key=search["loss"].get)
    assert result.layers[-1].accumulated_error is not None  # the quantized stream was propagated


def test_per_token_w8a8_is_nearly_lossless(setup):
    _, _, base = setup
    rec = parse_recipe({**load_recipe("w8a8-sq-pertoken").to_dict(), "algorithm": {"name": "smoothquant", "alpha": 0.5}})
    ppl, _ = _ppl(setup, rec)
    assert ppl < base * 1.003
