"""Serving limits and the errors a request can get, one status code each."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import SqDeployError


@dataclass(frozen=True)
class ServeLimits:
    """What one server accepts.

    ``max_concurrent`` sequences decode together (the batch size); up to ``max_queue`` more
    wait for a slot; beyond that a request is refused with HTTP 429 straight away rather
    than left to time out.
    """

    max_prompt_tokens: int = 2048
    max_new_tokens: int = 1024
    max_concurrent: int = 8
    max_queue: int = 64
    request_timeout_s: float = 600.0
    max_body_bytes: int = 1 << 20

    def __post_init__(self):
        for name in ("max_prompt_tokens", "max_new_tokens", "max_concurrent", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise SqDeployError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_queue < 0 or self.request_timeout_s <= 0:
            raise SqDeployError("--max-queue must be >= 0 and --request-timeout > 0")

    @property
    def capacity(self) -> int:
        return self.max_concurrent + self.max_queue


class RequestError(Exception):
    """A request the server refuses; ``status`` is its HTTP code, ``param`` the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def bad_request(message: str, param: str | None = None) -> RequestError:
    return RequestError(400, message, param)


def overloaded(limits: ServeLimits) -> RequestError:
    return RequestError(
        429,
        f"the server is at capacity ({limits.max_concurrent} running + {limits.max_queue} queued); retry later",
        kind="rate_limit_exceeded",
    )


def draining() -> RequestError:
    return RequestError(
        503, "the server is shutting down and accepts no new requests; retry on another replica", kind="server_shutting_down"
    )


def timed_out(limits: ServeLimits) -> RequestError:
    return RequestError(
        504,
        f"the request did not finish within the server's {limits.request_timeout_s:g} s timeout; "
        "ask for fewer tokens or retry later",
        kind="timeout",
    )
