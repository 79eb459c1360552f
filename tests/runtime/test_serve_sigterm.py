"""sq-serve as users run it: a process that drains requests in flight on SIGTERM, then exits 0, or, when the
drain timeout cuts requests short, answers them properly and exits non-zero."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from sqdeploy.runtime.server.run import free_port
from tests.runtime_support import tiny_onnx


def start(engine_dir, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "sqdeploy.cli.serve", str(engine_dir), "--port", str(port), "--model-name", "tiny"]
    proc = subprocess.Popen([*cmd, "--log-level", "warning", *extra], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def events(lines):
    for line in lines:
        if line.startswith("data:") and line != "data: [DONE]":
            yield json.loads(line[5:])


def test_sigterm_drains_in_flight_requests_then_exits(tmp_path_factory, tiny_models):
    proc, url = start(tiny_onnx(tmp_path_factory, tiny_models))
    try:
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
            for data in events(r.iter_lines()):
                if data["choices"]:
                    chunks.append(data["choices"][0])
                    if len(chunks) == 1:
                        proc.send_signal(signal.SIGTERM)  # mid-generation
                usage = data.get("usage") or usage
        assert len(chunks) == 200 and chunks[-1]["finish_reason"] == "length" and usage["completion_tokens"] == 200
        assert proc.wait(timeout=60) == 0
    finally:
        stop(proc)


def test_drain_timeout_answers_what_it_cuts_and_exits_nonzero(tmp_path_factory, tiny_models):
    """One sequence at a time, a stream and a plain request of 16 x 240 tokens each: seconds of work that a
    0.5 s drain timeout cuts. The stream ends with an error event and [DONE], the plain request gets a JSON 503."""
    proc, url = start(
        tiny_onnx(tmp_path_factory, tiny_models), "--max-concurrent-requests", "1", "--max-queue", "40", "--drain-timeout", "0.5"
    )
    try:
        body = {"model": "tiny", "prompt": ["def f(x):"] * 16, "max_tokens": 240, "ignore_eos": True}
        plain: list[httpx.Response] = []
        lines = []
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            it = r.iter_lines()
            for line in it:
                lines.append(line)
                if line.startswith("data:"):
                    break  # the stream is running
            worker = threading.Thread(target=lambda: plain.append(httpx.post(f"{url}/v1/completions", json=body, timeout=60)))
            worker.start()
            deadline = time.monotonic() + 30
            while "sqdeploy_inflight_sequences 32.0" not in httpx.get(f"{url}/metrics").text:
                assert time.monotonic() < deadline, "the plain request was not admitted"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            lines += list(it)
        worker.join(timeout=60)
        lines = [line for line in lines if line]
        assert lines[-1] == "data: [DONE]"
        *_, last = events(lines)
        assert last["error"]["code"] == "server_shutting_down" and "drain timeout" in last["error"]["message"]
        (r,) = plain
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down", r.text
        assert proc.wait(timeout=60) == 1
        assert "drain timeout expired" in proc.stderr.read()
    finally:
        stop(proc)
