"""Serving limits and the errors a request can get, one status code each."""

from __future__ import annotations

from dataclasses import dataclass

from sqdeploy.core.errors import SqDeployError


@dataclass(frozen=True)
class ServeLimits:
    """What one server accepts.

    ``max_concurrent`` sequences decode together (the batch size); up to ``max_queue`` more
    wait for a slot; beyond that a request is refused with HTTP 429 straight away rather
    than left to time out (a request with more prompts than both together can ever hold
    gets a 400).

    The connection limits keep a flood of slow or idle clients from starving real ones:
    at most ``max_connections`` are open (at the limit the longest-idle connection that
    has not sent a complete request is closed for a new one), request headers must
    arrive within ``header_timeout_s`` of their first byte (or of the connection opening),
    a body within ``body_timeout_s`` of its headers (else HTTP 408).
    """

    max_prompt_tokens: int = 2048
    max_new_tokens: int = 1024
    max_concurrent: int = 8
    max_queue: int = 64
    request_timeout_s: float = 600.0
    max_body_bytes: int = 1 << 20
    max_connections: int = 512
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0

    def __post_init__(self):
        for name in ("max_prompt_tokens", "max_new_tokens", "max_concurrent", "max_body_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise SqDeployError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_queue < 0 or self.request_timeout_s <= 0:
            raise SqDeployError("--max-queue must be >= 0 and --request-timeout > 0")
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise SqDeployError("--header-timeout and --body-timeout must be > 0")

    @property
    def capacity(self) -> int:
        return self.max_concurrent + self.max_queue


@dataclass(frozen=True)
class ServeOptions:
    """``api_key``: the Bearer token every route but health requires (None: no authentication).
    ``chat_template``: a Jinja chat template used instead of the tokenizer's own."""

    api_key: str | None = None
    chat_template: str | None = None

    def __repr__(self) -> str:  # never print the key
        return f"ServeOptions(api_key={'***' if self.api_key else None}, chat_template={self.chat_template is not None})"


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


def too_many_prompts(limits: ServeLimits, n: int) -> RequestError:
    return RequestError(
        400,
        f"the request has {n} prompts but this server holds at most {limits.capacity} sequences "
        f"({limits.max_concurrent} running + {limits.max_queue} queued); send at most {limits.capacity} per request",
        "prompt",
    )


def draining() -> RequestError:
    return RequestError(
        503, "the server is shutting down and accepts no new requests; retry on another replica", kind="server_shutting_down"
    )


def shut_down(drain_timeout_s: float) -> RequestError:
    return RequestError(
        503,
        f"the server shut down before this request finished (its {drain_timeout_s:g} s drain timeout expired); "
        "retry on another replica",
        kind="server_shutting_down",
    )


def timed_out(limits: ServeLimits) -> RequestError:
    return RequestError(
        504,
        f"the request did not finish within the server's {limits.request_timeout_s:g} s timeout; "
        "ask for fewer tokens or retry later",
        kind="timeout",
    )


def error_body(path: str, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    """OpenAI's error object under /v1, KServe's ``{"error": message}`` elsewhere."""
    if path.startswith("/v1"):
        group = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": message, "type": group, "param": param, "code": kind}}
    return {"error": message}
