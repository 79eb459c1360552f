"""Quality on the real shared models: every algorithm against its baseline, within the paired standard error.

Cheap settings (a small calibration set, small search grids; the 24 standard windows, as fewer
leave INT4 differences of 1% within two standard errors)
keep this fast; the README's figures come from ``tools/quality.py``. Each comparison is
paired (both models on the same windows) and its bound is derived from the paired standard
error ``se`` of the per-window differences: "A beats B" means ``change + 2 se < 0`` (a
difference noise would give less than 2.5% of the time), "A is never worse than B" means
``change < 2 se``. The assertions that must hold on *both* models (a Llama and a Qwen2 of
other training data and outliers) are what a default recipe setting has to pass.
"""

from __future__ import annotations

from functools import lru_cache

import pytest

from sqdeploy.evaluate.perplexity import eval_windows, model_logits_fn, paired_change, perplexity, read_text
from sqdeploy.model import HFCheckpoint, load_model
from sqdeploy.quantize.pipeline import Calibration, Runtime, load_tokenizer, quantize_in_memory
from sqdeploy.quantize.recipes import parse_recipe
from tests.conftest import HUMANEVAL, SHARED

CAL = Calibration(str(HUMANEVAL), 16, 256)
W8_STATIC = {"weight": {"bits": 8, "granularity": "channel"}, "act": {"kind": "static_tensor"}}
W8_TOKEN = {"weight": {"bits": 8, "granularity": "channel"}, "act": {"kind": "dynamic_token"}}
W4 = {"weight": {"bits": 4, "granularity": "group", "group_size": 128, "symmetric": False}}
SEARCH = {"alpha": "search", "grid": [0.5, 0.8], "search_groups": False, "search_holdout": 4, "search_samples": 12}
RECIPES = {
    "w8-plain": (W8_STATIC, "rtn"),
    "w8-sq0.5": (W8_STATIC, {"name": "smoothquant", "alpha": 0.5}),
    "w8-search": (W8_STATIC, {"name": "smoothquant", **SEARCH}),
    "w8-token-search": (W8_TOKEN, {"name": "smoothquant", **SEARCH}),
    "w4-rtn": (W4, "rtn"),
    "w4-awq": (W4, {"name": "awq", "grid": 10, "search_samples": 4}),
    "w4-sqplus": (W4, {"name": "smoothquant_plus", **SEARCH, "grid": [0.3, 0.5], "rounding": "gptq",
                       "gptq_act_order": True, "gptq_damp": 0.1, "search_refine": 1}),
}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    path = SHARED / "models" / f"tiny-code-{request.param}"
    if not (path / "config.json").exists():
        pytest.skip(f"shared model not found at {path}")
    return request.param


@lru_cache(maxsize=None)
def _windows(key: str):
    ck = HFCheckpoint(SHARED / "models" / f"tiny-code-{key}")
    return eval_windows(load_tokenizer(ck.path), read_text(SHARED / "data" / f"heldout-code-{key}.txt.gz"), 24, 512)


@lru_cache(maxsize=None)
def _nll(key: str, name: str) -> tuple[float, ...]:
    """Per-window NLLs of the float model (``name`` float) or of a recipe of :data:`RECIPES`."""
    ck = HFCheckpoint(SHARED / "models" / f"tiny-code-{key}")
    if name == "float":
        model = load_model(ck)
    else:
        scheme, algo = RECIPES[name]
        model, _ = quantize_in_memory(ck, parse_recipe({"name": name, "scheme": scheme, "algorithm": algo}), CAL,
                                      Runtime(progress=False))
    return tuple(perplexity(model_logits_fn(model), _windows(key)).per_window_nll)


def _change(key: str, base: str, other: str):
    return paired_change(_nll(key, base), _nll(key, other))


def beats(key: str, better: str, base: str) -> None:
    c = _change(key, base, better)
    assert c.relative + 2 * c.stderr < 0, f"{key}: {better} vs {base}: {c}"


def never_worse(key: str, candidate: str, base: str) -> None:
    c = _change(key, base, candidate)
    assert c.relative < 2 * c.stderr, f"{key}: {candidate} vs {base}: {c}"


def test_smoothquant_fixes_static_w8a8_outliers(model):
    beats(model, "float", "w8-plain")  # the outliers hurt without smoothing ...
    beats(model, "w8-sq0.5", "w8-plain")  # ... and smoothing removes much of the loss


def test_smoothing_search_never_loses_to_the_simple_baselines(model):
    never_worse(model, "w8-search", "w8-plain")
    never_worse(model, "w8-search", "w8-sq0.5")


def test_per_token_w8a8_is_nearly_lossless(model):
    c = _change(model, "float", "w8-token-search")
    assert c.relative - 2 * c.stderr < 0.002, f"{model}: {c}"


def test_int4_algorithms_against_round_to_nearest(model):
    """AWQ and the searched SmoothQuant+ (which keeps s = 1 and round-to-nearest among its candidates)
    are never worse than INT4 round-to-nearest. On the Llama SmoothQuant+ with GPTQ clearly beats
    it; on the Qwen2 the difference is within the noise of 24 windows (there even round-to-nearest's
    +0.7% against float is: +0.74% ± 0.65% on the standard windows)."""
    never_worse(model, "w4-awq", "w4-rtn")
    never_worse(model, "w4-sqplus", "w4-rtn")
    if model == "llama":
        beats(model, "w4-sqplus", "w4-rtn")
