"""Running the server: uvicorn with a graceful drain on SIGTERM/SIGINT, in the foreground or in a thread.

On the signal the server reports not-ready, refuses new generation requests with 503,
lets every request in flight finish (up to ``drain_timeout_s``), then stops the
engine and exits.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import uvicorn

from ..engine import Engine
from .app import create_app
from .limits import ServeLimits


class DrainingServer(uvicorn.Server):
    def handle_exit(self, sig, frame) -> None:
        bridge = getattr(self.config.app.state, "bridge", None)
        if bridge is not None:
            bridge.draining = True  # not ready, no new generations; requests in flight go on
        super().handle_exit(sig, frame)


def make_server(
    engine: Engine,
    host: str,
    port: int,
    limits: ServeLimits,
    drain_timeout_s: float = 60.0,
    log_level: str = "info",
    access_log: bool = False,
) -> DrainingServer:
    app = create_app(engine, limits)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=drain_timeout_s,
        lifespan="on",
        timeout_keep_alive=30,
    )
    return DrainingServer(config)


def serve(
    engine: Engine, host: str, port: int, limits: ServeLimits, drain_timeout_s: float = 60.0, log_level: str = "info"
) -> None:
    """Serve until SIGTERM/SIGINT, drain, then shut the engine down."""
    server = make_server(engine, host, port, limits, drain_timeout_s, log_level)
    # uvicorn re-raises the signal once it has drained, with the handler it found installed; a no-op
    # handler here makes a completed drain end the process normally (exit code 0)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        engine.shutdown(drain=False)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """A server on a background thread (tests, notebooks): ``with ServerThread(engine) as url: ...``."""

    def __init__(self, engine: Engine, limits: ServeLimits = ServeLimits(), host: str = "127.0.0.1", port: int | None = None):
        self.host, self.port = host, port or free_port(host)
        self.server = make_server(engine, self.host, self.port, limits, drain_timeout_s=10.0, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, name="sq-serve", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
