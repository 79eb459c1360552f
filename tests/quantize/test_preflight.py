"""Disk and GPU memory estimates behind the checks that run before calibration."""

from __future__ import annotations

import shutil

import pytest

from sqdeploy.cli.export import main as export_main
from sqdeploy.core.errors import SqDeployError
from sqdeploy.model.checkpoint import HFCheckpoint
from sqdeploy.quantize import preflight
from sqdeploy.quantize.pipeline import storage_dtype
from sqdeploy.quantize.recipes import load_recipe


@pytest.mark.parametrize("recipe", ["w8a8-sq-o1", "w4a16-rtn", "fp16"])
def test_quantized_size_estimate_is_close_and_not_below(tiny_models, tmp_path, calib_file, recipe):
    model = tiny_models["llama"]
    out = tmp_path / "q"
    assert export_main([str(model), "--recipe", recipe, "--out", str(out), "--calib", str(calib_file),
                        "--calib-samples", "2", "--calib-seq-len", "32", "--quiet"]) == 0
    actual = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    ck = HFCheckpoint(model)
    r = load_recipe(recipe)
    estimate = preflight.quantized_model_bytes(ck.config, r.scheme, storage_dtype(r, ck.config))
    assert actual * 0.95 <= estimate <= actual * 1.6, (estimate, actual)


def test_check_disk_names_sizes_and_remedy(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 * 2**30, 9 * 2**30, 2**30))
    preflight.check_disk(tmp_path / "new" / "out", 2**29)  # fits: no error
    with pytest.raises(SqDeployError, match=r"needs|writes about 2\.0 GiB.*1\.0 GiB are free.*another disk"):
        preflight.check_disk(tmp_path / "new" / "out", 2 * 2**30)


def test_gpu_need_grows_with_the_layer_and_the_activations(tiny_models):
    cfg = HFCheckpoint(tiny_models["llama"]).config
    base = preflight.gpu_bytes_needed(cfg, 8, 128, hessian=False)
    assert preflight.gpu_bytes_needed(cfg, 8, 128, hessian=True) > base
    assert preflight.gpu_bytes_needed(cfg, 16, 128, hessian=False) > base
    layer = sum(o * i for o, i in (cfg.linear_shape(n) for n in cfg.linears)) * 4
    assert base > layer
    # the calibration set's hidden states (in and out of the layer) stay on the GPU between layers
    streams = preflight.gpu_bytes_needed(cfg, 8, 128, hessian=False, samples=128) - base
    assert streams == 2 * 128 * 128 * cfg.hidden_size * 4


def test_check_gpu_refuses_a_small_gpu_and_passes_a_large_one(tiny_models, monkeypatch):
    cfg = HFCheckpoint(tiny_models["llama"]).config
    need = preflight.gpu_bytes_needed(cfg, 8, 128, hessian=True)
    monkeypatch.setattr(preflight, "gpu_free_bytes", lambda d: (need + 1, 2 * need))
    preflight.check_gpu("cuda", cfg, 8, 128, True)
    monkeypatch.setattr(preflight, "gpu_free_bytes", lambda d: (need - 1, 2 * need))
    with pytest.raises(SqDeployError, match="--device cuda has .* GiB free.*--batch.*--device cpu"):
        preflight.check_gpu("cuda", cfg, 8, 128, True)
    preflight.check_gpu("cpu", cfg, 8, 128, True)  # no GPU asked for: nothing to check
