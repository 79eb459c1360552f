"""sq-export --target onnx, sq-check onnx and sq-eval on the export, end to end; and every refusal."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sqdeploy.cli.check import main as check_main
from sqdeploy.cli.eval import main as eval_main
from sqdeploy.cli.export import main as export_main
from sqdeploy.core.errors import SqDeployError
from sqdeploy.formats.onnx.contract import read_manifest
from sqdeploy.testing.random_model import make_random_model

CALIB = ["--calib-samples", "4", "--calib-seq-len", "64", "--quiet"]


def _export(model, out, recipe, calib, *extra):
    return export_main([str(model), "--recipe", recipe, "--target", "onnx", "--out", str(out), "--calib", str(calib), *CALIB, *extra])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "sqdeploy.cli.export", *map(str, args)], capture_output=True, text=True)


def test_export_check_and_eval(tiny_models, tmp_path, calib_file, capsys):
    out = tmp_path / "onnx"
    assert _export(tiny_models["llama"], out, "w4a16-rtn", calib_file, "--onnx-variant", "onnxruntime") == 0
    meta = read_manifest(out)
    assert meta["format"] == "sqdeploy.onnx" and meta["int4_format"] == "matmulnbits" and meta["variant"] == "onnxruntime"
    assert meta["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"] and meta["outputs"][1] == "present.0.key"
    assert (meta["num_heads"], meta["num_kv_heads"], meta["head_dim"], meta["dtype"]) == (8, 2, 16, "float32")
    assert meta["quantization"]["quantized_linears"] == 14 and meta["reference"] == "quantized"
    assert (out / "tokenizer.json").exists() and (out / "quantized" / "sqdeploy.json").exists()
    assert not (out / "model.onnx.data").exists()
    assert check_main(["onnx", str(out), "--windows", "2", "--seq-len", "64"]) == 0
    report = capsys.readouterr().out
    assert "FAIL" not in report and "MatMulNBits 8/8" in report
    text = tmp_path / "t.txt"
    text.write_text(calib_file.read_text() * 4)
    scores = {}
    for name, path in (("onnx", out), ("quantized", out / "quantized")):
        js = tmp_path / f"{name}.json"
        assert eval_main([str(path), "--text", str(text), "--windows", "2", "--seq-len", "64", "--json", str(js)]) == 0
        scores[name] = json.loads(js.read_text())["results"][0]["perplexity"]
    assert scores["onnx"] == pytest.approx(scores["quantized"], rel=1e-5)


def test_export_from_quantized_dir_with_external_data(tiny_models, tmp_path, calib_file):
    q = tmp_path / "q"
    assert export_main([str(tiny_models["opt"]), "--recipe", "w8a8-sq", "--out", str(q), "--calib", str(calib_file), *CALIB]) == 0
    out = tmp_path / "onnx"
    assert export_main([str(q), "--target", "onnx", "--out", str(out), "--external-data", "--quiet"]) == 0
    meta = read_manifest(out)
    assert meta["external_data"] and (out / "model.onnx.data").stat().st_size > 1_000_000
    assert meta["reference"] == str(q.resolve()) and not (out / "quantized").exists()
    assert check_main(["onnx", str(out), "--windows", "1", "--seq-len", "64"]) == 0


def test_checker_fails_on_a_wrong_reference_and_wrong_counts(tiny_models, tmp_path, calib_file, capsys):
    out = tmp_path / "onnx"
    assert _export(tiny_models["llama"], out, "w4a16-rtn", calib_file) == 0
    other = tmp_path / "other"
    assert export_main([str(tiny_models["llama"]), "--recipe", "w8a16-rtn", "--out", str(other), "--calib", str(calib_file), *CALIB]) == 0
    assert check_main(["onnx", str(out), "--reference", str(other), "--windows", "1", "--seq-len", "64"]) == 1
    assert "FAIL" in capsys.readouterr().out
    meta = json.loads((out / "sqdeploy-onnx.json").read_text())
    meta["quantization"]["quantized_matmuls"] = 7
    (out / "sqdeploy-onnx.json").write_text(json.dumps(meta))
    with pytest.raises(SqDeployError, match="sqdeploy-onnx.json differs from the file written at export"):
        check_main(["onnx", str(out), "--skip-runtime"])
    (out / ".sqdeploy-output.json").unlink()  # as written before hashes were recorded: the counts are checked
    assert check_main(["onnx", str(out), "--skip-runtime"]) == 1
    assert "| quantization op counts" in capsys.readouterr().out


@pytest.mark.parametrize("recipe, extra, message", [
    ("w4a16-rtn", ["--opset", "19"], "--opset 19 is too old for INT4 QDQ: int4/uint4 block-wise DequantizeLinear needs opset 21"),
    ("w4a16-rtn", ["--int4-format", "matmulnbits"], "MatMulNBits is an ONNX Runtime contrib op"),
    ("w8a8-sq-pertoken", [], "dynamic activation scales (dynamic_token) cannot be expressed in the tensorrt variant"),
    ("w8a8-sq", ["--int4-format", "qdq"], "--int4-format applies to weight-only schemes"),
    ("w8a8-sq", ["--opset", "12"], "--opset 12 is not supported"),
])
def test_refused_before_anything_is_written(tiny_models, tmp_path, calib_file, recipe, extra, message):
    r = _cli(tiny_models["llama"], "--recipe", recipe, "--target", "onnx", "--out", tmp_path / "o", "--calib", calib_file, *CALIB, *extra)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.sqdeploy-*"))


def test_unsupported_head_layout(tmp_path, calib_file):
    model = make_random_model("llama", tmp_path / "m", head_dim=12)  # 8 heads x 12: not a GroupQueryAttention size
    r = _cli(model, "--recipe", "fp16", "--target", "onnx", "--onnx-variant", "onnxruntime", "--out", tmp_path / "o", "--quiet")
    assert r.returncode == 2 and "head_dim 12 is not a multiple of 8" in r.stderr and "--onnx-variant tensorrt" in r.stderr
    assert not (tmp_path / "o").exists()
