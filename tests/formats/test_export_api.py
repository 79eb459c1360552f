"""``sqdeploy.formats.export.export``: the options object picks the target, and the Python API
writes exactly what ``sq-export --target T`` writes with the matching flags."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sqdeploy.cli.export import main as export_main
from sqdeploy.core.errors import SqDeployError
from sqdeploy.formats.export import export
from sqdeploy.formats.onnx.options import OnnxExportOptions
from sqdeploy.formats.trtllm.options import TrtllmHfOptions, TrtllmOptions
from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize_to_dir
from sqdeploy.quantize.recipes import parse_recipe

QUIET = Runtime(progress=False)


@pytest.fixture(scope="module")
def quantized(tiny_models, calib_file, tmp_path_factory):
    """The tiny Llama quantized weight-only INT4 (group 128 and 64, asymmetric) and W8A8 (static, per tensor)."""
    root = tmp_path_factory.mktemp("export-api")
    cal = Calibration(str(calib_file), 4, 64)
    g64 = parse_recipe({"name": "w4a16-g64", "algorithm": "rtn",
                        "scheme": {"weight": {"bits": 4, "granularity": "group", "group_size": 64, "symmetric": False}}})
    return {getattr(r, "name", r): quantize_to_dir(tiny_models["llama"], r, root / getattr(r, "name", r), cal, QUIET, keep_source=True)[0]
            for r in ("w4a16-rtn", "w8a8-sq-o3", g64)}


def _cli(src, out, *flags):
    assert export_main([str(src), "--out", str(out), "--quiet", *flags]) == 0


def _same_files(a, b, names):
    """Byte-equal files; safetensors tensor by tensor (its header's metadata order is not fixed)."""
    for name in names:
        if name.endswith(".safetensors"):
            ta, tb = load_file(str(a / name)), load_file(str(b / name))
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) and ta[k].dtype == tb[k].dtype for k in ta), name
            with safe_open(str(a / name), "pt") as fa, safe_open(str(b / name), "pt") as fb:
                assert fa.metadata() == fb.metadata(), name
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_onnx_options_from_a_quantized_dir(quantized, tmp_path):
    qdir = quantized["w4a16-rtn"]
    options = OnnxExportOptions(variant="onnxruntime", dtype="float32", int4_accuracy_level=0)
    report = export(qdir, options, tmp_path / "api", runtime=QUIET)
    meta = json.loads((tmp_path / "api" / "sqdeploy-onnx.json").read_text())
    assert (meta["variant"], meta["dtype"], meta["int4_format"]) == ("onnxruntime", "float32", "matmulnbits")
    assert meta["reference"] == str(qdir.resolve()) and report["op_counts"].get("MatMulNBits")
    _cli(qdir, tmp_path / "cli", "--target", "onnx", "--onnx-variant", "onnxruntime", "--dtype", "float32")
    _same_files(tmp_path / "api", tmp_path / "cli", ["model.onnx", "sqdeploy-onnx.json", "genai_config.json"])


def test_onnx_from_a_float_model_keeps_or_drops_the_reference(tiny_models, calib_file, tmp_path):
    cal = Calibration(str(calib_file), 4, 64)
    export(tiny_models["llama"], OnnxExportOptions(dtype="float32"), tmp_path / "kept", "w8a8-sq-o3", cal, QUIET)
    assert (tmp_path / "kept" / "quantized" / "sqdeploy.json").exists()
    export(tiny_models["llama"], OnnxExportOptions(dtype="float32", reference_copy=False), tmp_path / "dropped",
           "w8a8-sq-o3", cal, QUIET)
    assert not (tmp_path / "dropped" / "quantized").exists()
    assert json.loads((tmp_path / "dropped" / "sqdeploy-onnx.json").read_text())["reference"] is None
    _same_files(tmp_path / "kept", tmp_path / "dropped", ["model.onnx"])  # the same quantization either way


def test_trtllm_options_shard_like_the_flags(quantized, tmp_path):
    qdir = quantized["w8a8-sq-o3"]
    report = export(qdir, TrtllmOptions(tp=2), tmp_path / "api", runtime=QUIET)
    assert report["tp"] == 2 and report["out"] == str(tmp_path / "api")
    config = json.loads((tmp_path / "api" / "config.json").read_text())
    assert config["mapping"]["tp_size"] == 2
    _cli(qdir, tmp_path / "cli", "--target", "trtllm", "--tp", "2")
    _same_files(tmp_path / "api", tmp_path / "cli", ["config.json", "rank0.safetensors", "rank1.safetensors"])


def test_trtllm_hf_options(quantized, tmp_path):
    report = export(quantized["w4a16-g64"], TrtllmHfOptions(), tmp_path / "hf", runtime=QUIET)
    assert report["target"] == "trtllm-hf" and report["quant_algo"] == "W4A16_AWQ"
    assert (tmp_path / "hf" / "hf_quant_config.json").exists()


def test_bad_requests_are_refused(quantized, tiny_models, tmp_path):
    with pytest.raises(SqDeployError, match="no target's options; pass one of OnnxExportOptions"):
        export(quantized["w4a16-rtn"], object(), tmp_path / "x")
    with pytest.raises(SqDeployError, match="pass a recipe"):
        export(tiny_models["llama"], TrtllmOptions(), tmp_path / "x")
    with pytest.raises(SqDeployError, match="kv_cache 'fp8'"):
        TrtllmOptions(kv_cache="fp8")
    with pytest.raises(SqDeployError, match="tensorrt variant"):  # the precheck runs before anything is written
        export(quantized["w4a16-rtn"], OnnxExportOptions(int4_format="matmulnbits"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flags, message", [
    (["--kv-cache", "int8"], "drop --kv-cache"),
    (["--tp", "2"], "drop --tp/--pp"),
    (["--int4-zero-point"], "only offered (experimentally) for --target trtllm"),
])
def test_trtllm_hf_refuses_the_shared_flags_it_cannot_honour(quantized, tmp_path, flags, message):
    with pytest.raises(SqDeployError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export_main([str(quantized["w4a16-rtn"]), "--target", "trtllm-hf", "--out", str(tmp_path / "x"), *flags])
