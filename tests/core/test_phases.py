"""The phase-timing record sq-export writes at exit when SQDEPLOY_PHASES_JSON is set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import time
from sqdeploy.core import phases
time.sleep(0.05)
phases.lap("first")
phases.section("outer")
time.sleep(0.02)
phases.lap()
phases.lap("first")
raise SystemExit(3)
"""


def test_record_written_at_exit_also_after_an_error(tmp_path):
    out = tmp_path / "phases.json"
    env = {**os.environ, "SQDEPLOY_PHASES_JSON": str(out), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=tmp_path)
    assert proc.returncode == 3
    rec = json.loads(out.read_text())
    assert rec["counts"] == {"first": 2, "outer": 1}
    assert rec["phases"]["first"] >= 0.05 and rec["phases"]["outer"] >= 0.02
    assert rec["peak_rss_bytes"] > 0 and "cuda_max_memory_allocated" not in rec


def test_nothing_written_without_the_variable(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SQDEPLOY_PHASES_JSON"}
    env["PYTHONPATH"] = str(ROOT)
    subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=tmp_path)
    assert list(tmp_path.iterdir()) == []
