"""sq-bench online against a live server: Poisson rates, closed loop and a replayed trace."""

from __future__ import annotations

import json
import math

import pytest

from sqdeploy.cli.bench import main
from sqdeploy.core.errors import SqDeployError
from sqdeploy.runtime import BatchConfig, open_engine
from sqdeploy.runtime.bench.online import breakdown_rate, poisson_arrivals, read_trace
from sqdeploy.runtime.bench.stats import percentiles
from sqdeploy.runtime.server.run import ServerThread
from tests.runtime_support import tiny_onnx


def test_online_report(tmp_path_factory, tiny_models, tmp_path):
    engine = open_engine(tiny_onnx(tmp_path_factory, tiny_models), batch=BatchConfig(max_batch_size=4))
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        "\n".join(json.dumps({"arrival_time": t, "prompt": "def f(x):", "output_len": n}) for t, n in ((0.0, 3), (0.05, 5)))
    )
    try:
        with ServerThread(engine) as url:
            out = tmp_path / "report"
            argv = [
                "online",
                url,
                "--rates",
                "40,inf",
                "--concurrency",
                "2",
                "--trace",
                str(trace),
                "--num-requests",
                "6",
                "--input-len",
                "8",
                "--output-len",
                "4",
                "--tokenizer",
                str(tiny_models["llama"]),
                "--out",
                str(out),
                "--quiet",
            ]
            assert main(argv) == 0
    finally:
        engine.shutdown()
    report = json.loads((out / "report.json").read_text())
    points = report["points"]
    assert [p["label"] for p in points] == ["2 clients", "40 req/s", "all at once", "trace"]
    for p in points[:3]:
        assert p["failed"] == 0 and p["requests"] == 6 and p["output_tokens"] == 24
        assert 0 < p["ttft_s"]["p50"] <= p["ttft_s"]["p99"] and p["itl_s"]["p50"] > 0 and p["output_throughput"] > 0
        assert p["engine"]["steps"] >= 4 and 0 <= p["engine"]["idle_fraction"] <= 1.2  # sq-serve's engine counters
    assert points[3]["output_tokens"] == 8
    assert report["breakdown"]["rate"] in (None, 40.0)
    assert "TTFT p50/p90/p99 ms" in (md := (out / "report.md").read_text()) and "steps/delivering/idle" in md
    assert (out / "online.png").read_bytes()[:4] == b"\x89PNG"


def test_arrivals_percentiles_breakdown_and_trace_errors(tmp_path):
    a = poisson_arrivals(2000, 10.0, 0)
    assert a[0] == 0 and a == sorted(a) and 1 / 10 == pytest.approx(a[-1] / 1999, rel=0.1)
    assert poisson_arrivals(3, math.inf, 0) == [0.0, 0.0, 0.0]
    assert percentiles([1.0, 2.0, 3.0])["p50"] == 2.0 and percentiles([])["p90"] is None
    point = lambda rate, ttft: {"load": "rate", "value": rate, "ttft_s": {"p50": ttft}}
    assert breakdown_rate([point(4, 0.5), point(1, 0.1), point(2, 0.2), point(math.inf, 9.0)])["rate"] == 4
    assert breakdown_rate([point(1, 0.1), point(2, 0.39)])["rate"] is None
    assert breakdown_rate([point(1, 0.1)])["rate"] is None
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(SqDeployError, match="t.jsonl:1"):
        read_trace(bad)
    with pytest.raises(SqDeployError, match="--rates"):
        main(["online", "http://127.0.0.1:9", "--model", "m"])


def test_overhead_compares_offline_and_served_throughput(tmp_path_factory, tiny_models, tmp_path):
    out = tmp_path / "overhead"
    argv = ["overhead", str(tiny_onnx(tmp_path_factory, tiny_models)), "--batch-size", "2", "--input-len", "4", "--output-len", "4",
            "--rounds", "1", "--requests-per-round", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    (result,) = json.loads((out / "report.json").read_text())["results"]
    assert result["offline_median"] > 0 and result["served_median"] > 0
    assert result["served_vs_offline"] == pytest.approx(result["served_median"] / result["offline_median"])
    assert "served / offline" in (out / "report.md").read_text() and (out / "overhead.png").exists()


def test_load_shedding_is_counted_apart_from_errors():
    """A 429 is the server refusing work past its queue, not a broken request: the point says which."""
    from sqdeploy.runtime.bench.online import LoadPoint, RequestResult, summarize

    ok = RequestResult(sent=0.0, chunks=[0.1, 0.2], done=0.2, completion_tokens=2)
    shed = RequestResult(sent=0.0, done=0.01, error="HTTP 429: at capacity", status=429)
    broken = RequestResult(sent=0.0, done=0.01, error="HTTP 500: boom", status=500)
    p = summarize(LoadPoint("rate", 10.0), [ok, shed, shed, broken], 0.0)
    assert (p["failed"], p["rejected"], p["first_errors"]) == (1, 2, ["HTTP 500: boom"])
