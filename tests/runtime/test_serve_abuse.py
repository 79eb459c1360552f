"""Clients that misbehave: half-open and slow connections, slow bodies, floods of bad requests, clients that leave.

Everything runs on loopback with bounded counts and deadlines.
"""

from __future__ import annotations

import logging
import socket
import time

import httpx
import pytest

from sqdeploy.runtime.server.limits import ServeLimits
from sqdeploy.runtime.server.run import ServerThread
from tests.runtime.test_serve_protocols import PROMPT, engine  # noqa: F401 - fixture

HALF_OPEN = 300  # well above max_connections, far below the process's file limit
GUARDED = ServeLimits(max_connections=32, header_timeout_s=1.5, body_timeout_s=1.0, max_new_tokens=250)


class Captured(logging.Handler):
    """What the server's loggers let through (after their rate limit), formatted as a log file would hold it.
    Enter it after the server has started: uvicorn's logging setup replaces its loggers' handlers."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(logging.Formatter("%(levelname)s %(name)s %(message)s").format(record))

    def __enter__(self):
        for name in ("uvicorn.error", "sqdeploy.serve", "asyncio"):
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name in ("uvicorn.error", "sqdeploy.serve", "asyncio"):
            logging.getLogger(name).removeHandler(self)


def _closed(sock: socket.socket, wait: float) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_half_open_connections_do_not_starve_real_clients_and_the_log_stays_small(engine):  # noqa: F811
    with ServerThread(engine, GUARDED) as url, Captured() as log:
        host, port = url.removeprefix("http://").split(":")
        socks = []
        try:
            t0 = time.monotonic()
            for i in range(HALF_OPEN):
                s = socket.create_connection((host, int(port)), timeout=5)
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"")  # partial headers / nothing
                socks.append(s)
            for _ in range(HALF_OPEN):  # garbage: each one is an "Invalid HTTP request" warning
                with socket.create_connection((host, int(port)), timeout=5) as g:
                    g.sendall(b"\x00\x01 garbage\r\n\r\n")
                    g.recv(1024)
            start = time.monotonic()
            r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2}, timeout=10)
            took = time.monotonic() - start
            assert r.status_code == 200 and took < 2.0, took
            # the oldest half-open connections were closed to make room; within the header timeout the rest follow
            assert sum(_closed(s, 0.01) for s in socks) >= HALF_OPEN - GUARDED.max_connections
            deadline = t0 + GUARDED.header_timeout_s + 3.0
            assert all(_closed(s, max(0.01, deadline - time.monotonic())) for s in socks)
            time.sleep(1.1)  # the next message of a kind says how many were dropped
            with socket.create_connection((host, int(port)), timeout=5) as g:
                g.sendall(b"\x00\x01 garbage\r\n\r\n")
                g.recv(1024)
            elapsed = time.monotonic() - t0
        finally:
            for s in socks:
                s.close()
    text = "\n".join(log.lines)
    kinds = {line.split(" (")[0] for line in log.lines}
    # each kind of message: a burst of 20, then one a second (RateLimitedLog's defaults)
    assert len(log.lines) <= len(kinds) * (20 + elapsed + 1), text
    assert len(text) < 20_000 and "more like this were not logged" in text, text


def test_slow_headers_and_slow_bodies_are_cut(engine):  # noqa: F811
    with ServerThread(engine, GUARDED) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as s:
            t0 = time.monotonic()
            for chunk in (b"POST /v1/completions HTTP/1.1\r\n", b"Host: x\r\n", b"X-Slow: 1\r\n"):  # slowloris
                s.sendall(chunk)
                time.sleep(0.4)
            assert _closed(s, 3.0) and time.monotonic() - t0 < GUARDED.header_timeout_s + 1.5
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
            )
            s.settimeout(5)
            reply = b""
            while not reply.endswith(b"}"):
                part = s.recv(4096)
                if not part:
                    break
                reply += part
            assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in reply, reply
            assert _closed(s, 2.0)
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_a_plain_request_is_cancelled_when_its_client_leaves(engine):  # noqa: F811
    """60 prompts x 240 tokens through a batch of 4 take seconds; the client leaves after 0.3 s and the server
    stops generating at once instead of producing every token for nobody."""
    limits = ServeLimits(max_concurrent=4, max_queue=60, max_new_tokens=250)
    with ServerThread(engine, limits) as url:
        tokens0 = _metric(url, "sqdeploy_generation_tokens_total")
        body = {"model": "tiny", "prompt": [PROMPT] * 60, "max_tokens": 240, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, timeout=0.3)
        deadline = time.monotonic() + 10
        while _metric(url, "sqdeploy_inflight_sequences") > 0:
            assert time.monotonic() < deadline, "the request's sequences are still running after its client left"
            time.sleep(0.05)
        generated = _metric(url, "sqdeploy_generation_tokens_total") - tokens0
        assert generated < 60 * 240 / 2, generated
        assert _metric(url, 'sqdeploy_sequences_finished_total{reason="cancelled"}') == 60
        stats = httpx.get(f"{url}/v2/models/tiny/stats").json()["model_stats"][0]
        assert stats["inference_stats"]["fail"]["count"] == 60 and stats["inference_count"] == 0
        assert _metric(url, 'sqdeploy_requests_total{route="/v1/completions",status="499"}') == 1
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2}, timeout=5)
        assert r.status_code == 200


def test_the_connection_bound_fits_the_open_file_limit(monkeypatch):
    import resource

    from sqdeploy.core.errors import SqDeployError
    from sqdeploy.runtime.server import guard

    monkeypatch.setattr(resource, "getrlimit", lambda _: (256, 1024))
    raised = []
    monkeypatch.setattr(resource, "setrlimit", lambda _, limits: raised.append(limits))
    guard.ensure_fd_limit(512)
    assert raised == [(640, 1024)]  # 512 connections + the process's own files
    with pytest.raises(SqDeployError, match="lower --max-connections to 896"):
        guard.ensure_fd_limit(4096)
