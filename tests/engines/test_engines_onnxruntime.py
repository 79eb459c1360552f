"""sq-build --engine onnxruntime: the offline-optimised engine directory, built and run here."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sqdeploy.cli.build import main as build_main
from sqdeploy.cli.common import run_cli
from sqdeploy.core.errors import MissingDependencyError, SqDeployError
from sqdeploy.engines import onnxruntime as ort_engine
from sqdeploy.engines.onnxruntime import OrtOptions, _feeds, build_ort, load_engine_session, plan_ort
from sqdeploy.formats.onnx.contract import OnnxExport
from sqdeploy.testing.tiny_onnx import write_tiny_onnx_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_model):
    return write_tiny_onnx_dir(tmp_path_factory.mktemp("onnx") / "tiny", tokenizer_from=shared_model)


def test_build_and_run(tiny, tmp_path, capsys):
    out = tmp_path / "engine"
    assert build_main(["--engine", "onnxruntime", str(tiny), "--out", str(out), "--json", str(tmp_path / "r.json")]) == 0
    assert {"model.onnx", "model.onnx.data", "session.json", "sqdeploy-onnx.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    session = json.loads((out / "session.json").read_text())
    assert session["execution_provider"] == "CPUExecutionProvider"
    assert session["graph_optimization_level"] == "ORT_DISABLE_ALL"  # already optimised: load as is
    assert session["optimized_offline"]["level"] == "ORT_ENABLE_ALL" and session["optimized_offline"]["refused"] == []
    assert session["intra_op_num_threads"] == 0 and session["execution_mode"] == "sequential"
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verification"]["max_rel_diff_vs_source"] <= 1e-4
    assert report["verification"]["max_rel_diff_decode_vs_full"] <= 1e-4
    assert "logits vs source" in capsys.readouterr().out
    # the engine, loaded exactly as session.json says, continues a prompt with its KV cache like a full pass
    engine, src = load_engine_session(out), OnnxExport(out)
    names = [o.name for o in engine.get_outputs()]
    ids, mask = np.array([[11, 12, 13, 14]]), np.ones((1, 4), np.int64)
    full = dict(zip(names, engine.run(names, _feeds(src, ids, mask, None))))
    pre = dict(zip(names, engine.run(names, _feeds(src, ids[:, :3], mask[:, :3], None))))
    step = dict(zip(names, engine.run(names, _feeds(src, ids[:, 3:], mask, pre))))
    np.testing.assert_allclose(step["logits"][:, -1], full["logits"][:, -1], rtol=1e-5, atol=1e-4)


def _failing_levels(monkeypatch, fail: int):
    """Make the verification of the first ``fail`` levels tried report a difference above tolerance."""
    real, calls = ort_engine.verify_engine, []

    def verify(*args):
        check = real(*args)
        calls.append(check)
        if len(calls) <= fail:
            check.update(max_rel_diff_vs_source=0.5, ok=False)
        return check

    monkeypatch.setattr(ort_engine, "verify_engine", verify)
    return calls


def test_default_level_falls_back(tiny, tmp_path, monkeypatch, capsys):
    """Without --opt-level a level whose engine fails verification is refused and recorded, and the next one kept."""
    _failing_levels(monkeypatch, fail=1)
    out = tmp_path / "engine"
    assert build_main(["--engine", "onnxruntime", str(tiny), "--out", str(out), "--json", str(tmp_path / "r.json")]) == 0
    offline = json.loads((out / "session.json").read_text())["optimized_offline"]
    assert offline["level"] == "ORT_ENABLE_EXTENDED"
    refused = [(r["level"], r["max_rel_diff_vs_source"], r["tolerance"]) for r in offline["refused"]]
    assert refused == [("ORT_ENABLE_ALL", 0.5, 1e-4)]
    assert "refused" in offline["chosen"] and offline["verification"]["max_rel_diff_vs_source"] <= 1e-4
    printed = capsys.readouterr().out
    assert "ORT_ENABLE_ALL      | refused | 5.0e-01" in printed and "ORT_ENABLE_EXTENDED | kept" in printed
    assert json.loads((tmp_path / "r.json").read_text())["level"] == "ORT_ENABLE_EXTENDED"
    # the kept engine is the extended graph itself (the refused graph was replaced), and it runs
    assert (out / "model.onnx").exists() and load_engine_session(out).get_outputs()[0].name == "logits"


def test_explicit_level_that_fails_is_an_error(tiny, tmp_path, monkeypatch, capsys):
    _failing_levels(monkeypatch, fail=1)
    out = tmp_path / "engine"
    assert run_cli(build_main, ["--engine", "onnxruntime", str(tiny), "--out", str(out), "--opt-level", "extended"]) == 2
    err = capsys.readouterr().err
    assert "ORT_ENABLE_EXTENDED: 5.00e-01 vs the source" in err and "leave out --opt-level" in err
    assert not out.exists()


def test_no_level_passes(tiny, tmp_path, monkeypatch):
    calls = _failing_levels(monkeypatch, fail=4)
    with pytest.raises(SqDeployError, match="no optimisation level .* ORT_DISABLE_ALL: 5.00e-01"):
        build_main(["--engine", "onnxruntime", str(tiny), "--out", str(tmp_path / "engine")])
    assert len(calls) == 4 and not (tmp_path / "engine").exists()


def test_sq_serve_backend_reads_the_engine(tiny, tmp_path):
    backends = pytest.importorskip("sqdeploy.runtime.backends.onnxruntime")
    out = tmp_path / "engine"
    assert build_main(["--engine", "onnxruntime", str(tiny), "--out", str(out), "--execution-mode", "parallel"]) == 0
    settings = backends.SessionSettings.for_dir(out, "cpu", None)
    assert settings.prebuilt and settings.execution_mode == "parallel"
    assert settings.execution_provider == "CPUExecutionProvider"


def test_options_and_refusals(tiny, tmp_path, capsys):
    plan = plan_ort(tiny, tmp_path / "e", OrtOptions(provider="cpu", opt_level="basic", intra_op_threads=2, execution_mode="parallel"))
    s = plan.session_json()
    assert (s["optimized_offline"]["level"], s["intra_op_num_threads"], s["execution_mode"]) == ("ORT_ENABLE_BASIC", 2, "parallel")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        cuda = plan_ort(tiny, tmp_path / "e", OrtOptions(provider="cuda"))
        assert cuda.session_json()["optimized_offline"]["level"] == "ORT_ENABLE_EXTENDED"
        with pytest.raises(MissingDependencyError, match="onnxruntime-gpu"):
            build_ort(cuda, tmp_path)
    (tmp_path / "exists").mkdir()
    assert run_cli(build_main, ["--engine", "onnxruntime", str(tiny), "--out", str(tmp_path / "exists")]) == 2
    assert "already exists" in capsys.readouterr().err
    notok = tmp_path / "notok"
    notok.mkdir()
    for f in ("model.onnx", "model.onnx.data", "sqdeploy-onnx.json"):
        (notok / f).write_bytes((tiny / f).read_bytes())
    with pytest.raises(SqDeployError, match="no tokenizer files"):
        plan_ort(notok, tmp_path / "e", OrtOptions())
    (notok / "sqdeploy-onnx.json").unlink()
    with pytest.raises(SqDeployError, match="sqdeploy-onnx.json is missing"):
        plan_ort(notok, tmp_path / "e", OrtOptions())
    assert not (tmp_path / "e").exists()


def test_shared_model_engine(shared_model, tmp_path):
    """The real export of the shared model, optimised and run (enabled once the ONNX target is registered)."""
    from sqdeploy.formats.targets import load_targets

    if "onnx" not in load_targets():
        pytest.skip("the ONNX export target (sq-export --target onnx) is not part of this install yet")
    from sqdeploy.cli.export import main as export_main

    assert export_main([str(shared_model), "--recipe", "fp16", "--target", "onnx", "--out", str(tmp_path / "onnx"), "--quiet",
                        "--no-reference-copy"]) == 0
    assert build_main(["--engine", "onnxruntime", str(tmp_path / "onnx"), "--out", str(tmp_path / "engine"),
                       "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    v = report["verification"]
    assert v["max_rel_diff_vs_source"] <= v["tolerance"] and v["max_rel_diff_decode_vs_full"] <= v["tolerance"]
    # levels above the kept one are refused only with a measured difference above the tolerance
    assert all(max(r["max_rel_diff_vs_source"], r["max_rel_diff_decode_vs_full"]) > r["tolerance"] for r in report["refused"])
