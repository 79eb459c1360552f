"""sq-serve as users run it: a process that drains requests in flight on SIGTERM, then exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx

from sqdeploy.runtime.server.run import free_port
from tests.runtime_support import tiny_onnx


def test_sigterm_drains_in_flight_requests_then_exits(tmp_path_factory, tiny_models):
    engine_dir = tiny_onnx(tmp_path_factory, tiny_models)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sqdeploy.cli.serve",
            str(engine_dir),
            "--port",
            str(port),
            "--model-name",
            "tiny",
            "--log-level",
            "warning",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        body = {
            "model": "tiny",
            "prompt": "def f(x):",
            "max_tokens": 200,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        chunks, usage = [], None
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                data = json.loads(line[5:])
                if data["choices"]:
                    chunks.append(data["choices"][0])
                    if len(chunks) == 1:
                        proc.send_signal(signal.SIGTERM)  # mid-generation
                usage = data.get("usage") or usage
        assert len(chunks) == 200 and chunks[-1]["finish_reason"] == "length" and usage["completion_tokens"] == 200
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
