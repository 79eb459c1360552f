"""Long work is never silent: on a stream that is not a terminal (a log, CI, nohup) every step
is one line as it happens; the export prints its per-layer summary and times the whole run."""

from __future__ import annotations

import io
import subprocess
import sys

from sqdeploy.core.progress import Progress


def test_progress_prints_one_line_per_step_when_not_a_tty():
    stream = io.StringIO()  # isatty() is False, as for a pipe or a file
    with Progress(3, "quantizing (w8a8-sq)", stream=stream) as bar:
        for i in range(3):
            bar.update(f"layer {i + 1}/3: smoothquant")
            bar.advance()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines, 1):
        assert line.startswith(f"quantizing (w8a8-sq): {i}/3 layer {i}/3: smoothquant (") and line.endswith(" s)")
    quiet = io.StringIO()
    with Progress(3, "x", enabled=False, stream=quiet) as bar:
        bar.advance()
    assert quiet.getvalue() == ""


def test_export_to_a_pipe_logs_each_layer_and_the_summary(tiny_models, calib_file, tmp_path):
    out = tmp_path / "onnx"
    cmd = [sys.executable, "-m", "sqdeploy.cli.export", str(tiny_models["llama"]), "--recipe", "w8a8-sq-o3",
           "--calib", str(calib_file), "--calib-samples", "4", "--calib-seq-len", "32", "--target", "onnx",
           "--dtype", "float32", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    err = run.stderr.splitlines()
    for k in (1, 2):  # the tiny model's two layers, quantized then written into the graph
        assert any(line.startswith(f"quantizing (w8a8-sq-o3): {k}/2") for line in err), run.stderr
        assert any(line.startswith("ONNX graph (tensorrt, float32): " + f"{k}/2") for line in err), run.stderr
    assert "\r" not in run.stderr  # no redrawn bar in a log
    stdout = run.stdout
    assert "| layer | alpha |" in stdout and "w8a8-sq-o3:" in stdout  # the per-layer summary before the ONNX table
    assert stdout.index("| layer |") < stdout.index("ONNX export")
    assert stdout.strip().splitlines()[-1].startswith("done in ")
