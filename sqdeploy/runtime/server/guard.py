"""Connection-level defences uvicorn lacks: a header-read timeout, a bound on open connections, a quiet log.

uvicorn closes idle keep-alive connections, but a connection that sends nothing, or
sends its headers a byte at a time, is kept for ever, and nothing bounds how many are
open: enough of them exhaust file descriptors, and every refused ``accept`` is logged.
:class:`GuardedH11Protocol` (uvicorn's h11 protocol, chosen through ``Config(http=...)``)
closes a connection whose request headers are not complete ``header_timeout_s`` after
the connection opened or the request's first byte arrived, and when ``max_connections``
are open it makes room for a new one by closing the connection that has waited longest
without a complete request (the way nginx reuses idle connections); only when every
connection is busy with a request is the new one refused. :class:`RateLimitedLog`
bounds how many records each message of the server's loggers writes, so no flood of
bad clients can fill a disk.
"""

from __future__ import annotations

import logging
import resource
import threading
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from sqdeploy.core.errors import SqDeployError

log = logging.getLogger("sqdeploy.serve")

# descriptors the process needs besides its connections (model files, pipes, the listening socket)
_SPARE_FDS = 128


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout and the connection bound of ``config.sq_limits``."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer = None
        self._idle_since = time.monotonic()
        self._arm_header_timer()
        self._make_room()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._idle_since = time.monotonic()
            self._arm_header_timer()  # the first byte of a keep-alive connection's next request
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._idle_since = time.monotonic()

    @property
    def waiting_for_request(self) -> bool:
        """No complete request headers on this connection yet (new, slow, or idle between requests)."""
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _arm_header_timer(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.config.sq_limits.header_timeout_s, self._header_deadline)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.warning(
                "closed a connection whose request headers did not arrive within %g s (--header-timeout)",
                self.config.sq_limits.header_timeout_s,
            )
            self.timeout_keep_alive_handler()  # closes the transport

    def _make_room(self) -> None:
        limit = self.config.sq_limits.max_connections
        live = [c for c in self.connections if not c.transport.is_closing()]
        if len(live) <= limit:
            return
        idle = [c for c in live if c is not self and getattr(c, "waiting_for_request", False)]
        victim = min(idle, key=lambda c: c._idle_since) if idle else self
        log.warning(
            "more than %d connections are open (--max-connections): closed %s",
            limit,
            "the longest-idle one" if victim is not self else "the new one (every other is busy with a request)",
        )
        victim.timeout_keep_alive_handler()


def ensure_fd_limit(max_connections: int) -> None:
    """Raise the soft open-files limit to what ``max_connections`` need, or say how to."""
    need = max_connections + _SPARE_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise SqDeployError(
            f"--max-connections {max_connections} needs {need} open files but the limit is {hard} (ulimit -Hn); "
            f"lower --max-connections to {max(1, hard - _SPARE_FDS)} or raise the limit"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


class RateLimitedLog(logging.Filter):
    """At most ``burst`` records of one message at once and ``per_s`` a second after that; the next record
    let through says how many were dropped. Keys are the logger and the message template, so one
    flood does not hide other messages."""

    def __init__(self, burst: int = 20, per_s: float = 1.0, max_keys: int = 256):
        super().__init__()
        self.burst, self.per_s, self.max_keys = burst, per_s, max_keys
        self._buckets: dict[tuple[str, str], list[float]] = {}  # key -> [tokens, last refill, dropped]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            if key not in self._buckets and len(self._buckets) >= self.max_keys:
                key = (record.name, "")
            b = self._buckets.setdefault(key, [float(self.burst), now, 0])
            b[0] = min(self.burst, b[0] + (now - b[1]) * self.per_s)
            b[1] = now
            if b[0] < 1:
                b[2] += 1
                return False
            b[0] -= 1
            dropped, b[2] = int(b[2]), 0
        if dropped:
            record.msg = f"{record.getMessage()} ({dropped} more like this were not logged)"
            record.args = None
        return True


_SERVER_LOGGERS = ("uvicorn.error", "uvicorn.access", "asyncio", "sqdeploy.serve")


def setup_logs(level: str) -> None:
    """Install one :class:`RateLimitedLog` on each logger a flood of clients can make write, and give the
    server's own logger uvicorn's look on stderr (idempotent)."""
    for name in _SERVER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimitedLog) for f in logger.filters):
            logger.addFilter(RateLimitedLog())
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:  %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level.upper())
