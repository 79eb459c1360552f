"""AWQ (Lin et al.): per-channel scales searched on calibration activations beat round-to-nearest
where activation outliers meet INT4 weights."""

from __future__ import annotations

import torch

from sqdeploy.model import HFCheckpoint, load_model
from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize_in_memory
from sqdeploy.quantize.recipes import parse_recipe


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
