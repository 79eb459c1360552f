"""sq-export refuses, before calibration and with nothing written, an output that cannot fit on
its disk and a GPU too small for one layer (both mocked: the tests run on a CPU)."""

from __future__ import annotations

import shutil

import pytest
import torch

from sqdeploy.cli.common import run_cli
from sqdeploy.cli.export import main as export_main
from sqdeploy.quantize import pipeline, preflight


def _argv(model, out, calib, *extra):
    return [str(model), "--recipe", "w8a8-sq-o1", "--out", str(out), "--calib", str(calib), "--calib-samples", "2",
            "--calib-seq-len", "32", "--quiet", *extra]


@pytest.fixture
def calibration_spy(monkeypatch):
    """Records whether calibration started (the checks must come before it)."""
    started = []
    real = pipeline.calibration_set

    def spy(*a, **k):
        started.append(True)
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "calibration_set", spy)
    return started


def _free_disk(monkeypatch, free: int):
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(free * 4, free * 3, free))


@pytest.mark.parametrize("target", ["quantized", "trtllm", "onnx"])
def test_not_enough_disk_is_refused_before_calibration(tiny_models, tmp_path, calib_file, monkeypatch, calibration_spy,
                                                       capsys, target):
    parent = tmp_path / "exports"
    parent.mkdir()
    _free_disk(monkeypatch, 64 * 1024)
    extra = ("--onnx-variant", "onnxruntime") if target == "onnx" else ()
    code = run_cli(export_main, _argv(tiny_models["llama"], parent / "out", calib_file, "--target", target, *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "not enough free disk" in err[0] and "choose --out on another disk" in err[0]
    assert not calibration_spy
    assert list(parent.iterdir()) == []  # nothing written, no lock or temporary left


def test_enough_disk_exports(tiny_models, tmp_path, calib_file, monkeypatch, calibration_spy):
    _free_disk(monkeypatch, 2**40)
    assert export_main(_argv(tiny_models["llama"], tmp_path / "out", calib_file, "--target", "trtllm")) == 0
    assert calibration_spy and (tmp_path / "out" / "rank0.safetensors").exists()


def test_gpu_too_small_is_refused_before_calibration(tiny_models, tmp_path, calib_file, monkeypatch, calibration_spy,
                                                     capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(preflight, "gpu_free_bytes", lambda d: (2**20, 2**30))
    parent = tmp_path / "exports"
    parent.mkdir()
    code = run_cli(export_main, _argv(tiny_models["llama"], parent / "out", calib_file, "--target", "trtllm", "--device", "cuda"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "--device cuda has 0.0 GiB free" in err[0] and "--device cpu" in err[0]
    assert not calibration_spy
    assert list(parent.iterdir()) == []
