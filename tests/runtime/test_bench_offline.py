"""sq-bench offline: variants side by side, ratios to the first, JSON + Markdown + PNG."""

from __future__ import annotations

import json

import pytest

from sqdeploy.cli.bench import main
from sqdeploy.core.errors import SqDeployError
from sqdeploy.runtime.bench.offline import EngineSpec, OfflineGrid, prompts_for, run_offline
from tests.runtime_support import tiny_onnx


def test_offline_report_compares_variants(tmp_path_factory, tiny_models, tmp_path):
    onnx_dir = tiny_onnx(tmp_path_factory, tiny_models)
    out = tmp_path / "report"
    argv = [
        "offline",
        str(onnx_dir),
        str(tiny_models["llama"]),
        "--batch-sizes",
        "1,2",
        "--input-lens",
        "8",
        "--output-lens",
        "4",
        "--repeat",
        "1",
        "--in-process",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    variants = report["variants"]
    assert [v["engine_backend"] for v in variants] == ["onnxruntime", "torch"]
    for v in variants:
        assert [(r["batch_size"], r["input_len"], r["output_len"]) for r in v["rows"]] == [(1, 8, 4), (2, 8, 4)]
        for r in v["rows"]:
            assert r["tokens_per_s"] > 0 and 0 < r["ttft_s"] <= r["e2e_s"] and r["tpot_s"] > 0
            assert r["tokens_per_s"] == pytest.approx(r["batch_size"] * 4 / r["e2e_s"])
        assert v["peak_rss_mib"] > 0
    md = (out / "report.md").read_text()
    assert "tokens/s vs first" in md and "1.00x" in md and "![offline](offline.png)" in md
    assert (out / "offline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SqDeployError, match="exists"):
        main(argv)


def test_each_variant_runs_in_its_own_process(tmp_path_factory, tiny_models):
    grid = OfflineGrid(batch_sizes=(2,), input_lens=(4,), output_lens=(3,), repeat=1, warmup=0)
    (result,) = run_offline([EngineSpec(str(tiny_onnx(tmp_path_factory, tiny_models)))], grid, isolate=True, progress=False)
    assert result["rows"][0]["tokens_per_s"] > 0 and result["peak_rss_mib"] > 0
    with pytest.raises(SqDeployError, match="exceeds"):
        run_offline(
            [EngineSpec(str(tiny_models["llama"]))], OfflineGrid((1,), (200,), (100,), 1, 0), isolate=False, progress=False
        )


def test_prompts_are_the_same_for_every_variant():
    assert prompts_for(2, 5, 100, 0) == prompts_for(2, 5, 100, 0)
    assert len(prompts_for(3, 7, 100, 0)[2]) == 7 and min(min(p) for p in prompts_for(4, 9, 100, 1)) >= 16
