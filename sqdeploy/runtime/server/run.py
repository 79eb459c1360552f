"""Running the server: uvicorn with a graceful drain on SIGTERM/SIGINT, in the foreground or in a thread.

On the signal the server reports not-ready, refuses new generation requests with 503,
lets every request in flight finish (up to ``drain_timeout_s``), then stops the
engine and exits. Requests still running when the drain timeout expires are answered
properly (a JSON 503, or an error event and ``[DONE]`` on a stream) and
:func:`serve` reports them, so the process exits non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time

import uvicorn

from sqdeploy.runtime.engine import Engine
from sqdeploy.runtime.server.app import create_app
from sqdeploy.runtime.server.guard import GuardedH11Protocol, ensure_fd_limit, setup_logs
from sqdeploy.runtime.server.limits import ServeLimits, ServeOptions

log = logging.getLogger("sqdeploy.serve")

# after the drain timeout, how long answering the cut requests may take before uvicorn cancels them
_ABORT_GRACE_S = 5.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain_timeout_s: float):
        super().__init__(config)
        self.drain_timeout_s = drain_timeout_s

    @property
    def bridge(self):
        return getattr(self.config.app.state, "bridge", None)

    def handle_exit(self, sig, frame) -> None:
        if self.bridge is not None:
            self.bridge.draining = True  # not ready, no new generations; requests in flight go on
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        if self.bridge is not None:
            self.bridge.draining = True
        timer = asyncio.get_running_loop().call_later(self.drain_timeout_s, self._abort)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def _abort(self) -> None:
        cut = self.bridge.abort(self.drain_timeout_s) if self.bridge is not None else 0
        if cut:
            log.error("the %g s drain timeout expired: %d sequences in flight were cut short", self.drain_timeout_s, cut)


def make_server(
    engine: Engine,
    host: str,
    port: int,
    limits: ServeLimits,
    drain_timeout_s: float = 60.0,
    log_level: str = "info",
    access_log: bool = False,
    options: ServeOptions = ServeOptions(),
) -> DrainingServer:
    app = create_app(engine, limits, options)
    ensure_fd_limit(limits.max_connections)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=GuardedH11Protocol,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=drain_timeout_s + _ABORT_GRACE_S,
        lifespan="on",
        timeout_keep_alive=30,
        h11_max_incomplete_event_size=16 * 1024,  # request line and headers
    )
    config.sq_limits = limits  # read by GuardedH11Protocol
    setup_logs(log_level)
    return DrainingServer(config, drain_timeout_s)


def serve(
    engine: Engine,
    host: str,
    port: int,
    limits: ServeLimits,
    drain_timeout_s: float = 60.0,
    log_level: str = "info",
    options: ServeOptions = ServeOptions(),
) -> int:
    """Serve until SIGTERM/SIGINT, drain, then shut the engine down; the number of sequences the drain
    timeout cut short (0 after a complete drain)."""
    server = make_server(engine, host, port, limits, drain_timeout_s, log_level, options=options)
    # uvicorn re-raises the signal once it has drained, with the handler it found installed; a no-op
    # handler here makes a completed drain end the process normally (exit code 0)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        engine.shutdown(drain=False)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return server.bridge.aborted if server.bridge is not None else 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """A server on a background thread (tests, notebooks): ``with ServerThread(engine) as url: ...``."""

    def __init__(
        self,
        engine: Engine,
        limits: ServeLimits = ServeLimits(),
        host: str = "127.0.0.1",
        port: int | None = None,
        options: ServeOptions = ServeOptions(),
    ):
        self.host, self.port = host, port or free_port(host)
        self.server = make_server(
            engine, self.host, self.port, limits, drain_timeout_s=10.0, log_level="warning", options=options
        )
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
