"""Half-open connection flood against a real sq-serve process: do normal requests still succeed, how big is the log?

Starts ``sq-serve ENGINE_DIR`` from a checkout (``--repo``, default this one) under an open-file
limit (``--nofile``, 1024 as on most machines), then for ``--seconds`` opens connections in batches
of 100 that send nothing or half a request line and headers, keeping the newest ``--connections``
open, and after each batch sends one normal completion request (8 tokens, 10 s timeout). Writes
each request's status and latency, the server log's size and the checkout's commit to ``--out``
(JSON). Loopback only; every socket and the server are closed at the end.

    python -m sqdeploy.testing.random_model llama /tmp/tiny --dtype float32 --tokenizer-from ../shared/models/tiny-code-llama
    sq-export /tmp/tiny --target onnx --dtype float32 --out /tmp/tiny-onnx
    python tools/serve_flood.py /tmp/tiny-onnx --out docs/benchmarks/serve-flood.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqdeploy.core.report import cpu_model, source_revision  # noqa: E402 - after the checkout is on the path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flood(engine_dir: str, repo: Path, connections: int, seconds: float, nofile: int) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-m", "sqdeploy.cli.serve", engine_dir, "--port", str(port), "--model-name", "tiny"]
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "serve.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                ["bash", "-c", f"ulimit -n {nofile}; exec {shlex.join(serve)}"], stderr=log, stdout=log, cwd=repo
            )
            try:
                deadline = time.monotonic() + 120
                while True:
                    try:
                        if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"sq-serve did not start: {log_path.read_text()[-2000:]}")
                    time.sleep(0.2)
                socks: list[socket.socket] = []
                requests: list[tuple[str, float]] = []
                opened, t0 = 0, time.monotonic()
                while time.monotonic() - t0 < seconds:
                    for _ in range(100):
                        try:
                            s = socket.create_connection(("127.0.0.1", port), timeout=5)
                            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" if opened % 2 else b"")
                        except OSError:
                            break
                        socks.append(s)
                        opened += 1
                    start = time.monotonic()
                    try:
                        r = httpx.post(
                            f"{url}/v1/completions", json={"model": "tiny", "prompt": "def f(x):", "max_tokens": 8}, timeout=10
                        )
                        requests.append((str(r.status_code), round(time.monotonic() - start, 3)))
                    except httpx.HTTPError as exc:
                        requests.append((type(exc).__name__, round(time.monotonic() - start, 3)))
                    for s in socks[:-connections]:
                        s.close()
                    socks = socks[-connections:]
                    if len(socks) >= connections:
                        time.sleep(0.5)
                elapsed = time.monotonic() - t0
                for s in socks:
                    s.close()
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    code = proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    code = proc.wait()
        text = log_path.read_bytes()
    commit = source_revision(repo)
    return {
        "commit": commit,
        "machine": f"{cpu_model()}, {platform.system()} {platform.machine()}",
        "open_file_limit": nofile,
        "connections_held": connections,
        "connections_opened": opened,
        "seconds": round(elapsed, 1),
        "requests": requests,
        "requests_ok": sum(1 for status, _ in requests if status == "200"),
        "slowest_request_s": max(t for _, t in requests),
        "log_bytes": len(text),
        "log_lines": text.count(b"\n"),
        "exit_code": code,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("engine_dir")
    ap.add_argument("--repo", type=Path, default=ROOT, help="checkout whose sq-serve runs (default: this one)")
    ap.add_argument("--connections", type=int, default=1100)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--nofile", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result = {"command": shlex.join(sys.argv), **flood(args.engine_dir, args.repo, args.connections, args.seconds, args.nofile)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
