"""The ASGI application: both protocols, metrics, authentication, body limits and JSON errors everywhere."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from sqdeploy.runtime.engine import Engine
from sqdeploy.runtime.server import chat, kserve, openai
from sqdeploy.runtime.server.bridge import Bridge, ClientGone, serving
from sqdeploy.runtime.server.limits import RequestError, ServeLimits, ServeOptions, error_body
from sqdeploy.runtime.server.metrics import CONTENT_TYPE

log = logging.getLogger("sqdeploy.serve")

# probes need no key (as vLLM's --api-key leaves /health open)
OPEN_PATHS = frozenset({"/health", "/v2/health/live", "/v2/health/ready"})


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": data})


class TrackedSend:
    """An ASGI ``send`` that remembers whether the response has started (after which no error can be sent)."""

    def __init__(self, send):
        self.send, self.started = send, False

    async def __call__(self, message) -> None:
        self.started = self.started or message["type"] == "http.response.start"
        await self.send(message)


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413, by Content-Length or while reading a chunked body, and
    bodies that have not arrived ``timeout_s`` after their headers with 408 (the connection is then closed)."""

    def __init__(self, app, limit: int, timeout_s: float):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._reject(scope, send)
        seen = 0
        more_body = True
        deadline = asyncio.get_running_loop().time() + self.timeout_s

        async def limited_receive():
            nonlocal seen, more_body
            if not more_body:  # after the body: waiting for a disconnect, which may take as long as it takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                raise _BodyTimeout() from None
            if message["type"] == "http.request":
                more_body = message.get("more_body", False)
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        tracked = TrackedSend(send)
        try:
            await self.app(scope, limited_receive, tracked)
        except _TooLarge:
            if not tracked.started:
                await self._reject(scope, send)
        except _BodyTimeout:
            if not tracked.started:
                message = f"the request body did not arrive within {self.timeout_s:g} s of its headers"
                body = error_body(scope["path"], 408, message, "request_timeout")
                await send_json(send, 408, body, [(b"connection", b"close")])

    async def _reject(self, scope, send):
        message = f"the request body exceeds the server's {self.limit} byte limit"
        await send_json(send, 413, error_body(scope["path"], 413, message, "request_too_large"))


class _TooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


class RequireKey:
    """``Authorization: Bearer <key>`` on every route but the health probes; OpenAI's 401 otherwise."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        message = "a valid API key is required: send it as 'Authorization: Bearer <key>' (the key sq-serve was given)"
        body = error_body(scope["path"], 401, message, "invalid_api_key")
        await send_json(send, 401, body, [(b"www-authenticate", b"Bearer")])


class InternalErrors:
    """An unexpected exception becomes a JSON 500 on a connection that stays usable.

    (Starlette's fallback re-raises after its 500, and uvicorn then closes the connection,
    so a keep-alive client's next request would fail too.) A response already under way
    cannot be turned into an error: it is cut, as it must be.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        tracked = TrackedSend(send)
        try:
            await self.app(scope, receive, tracked)
        except ClientDisconnect:
            return  # the client left while sending its body: nobody to answer
        except Exception as exc:
            if tracked.started:
                raise
            log.error("internal error on %s %s", scope.get("method"), scope["path"], exc_info=exc)
            message = f"internal error ({type(exc).__name__}); the server keeps serving"
            await send_json(send, 500, error_body(scope["path"], 500, message, "server_error"))


class CountRequests:
    """``sqdeploy_requests_total{route,status}`` for every request, by route template (not raw path)."""

    def __init__(self, app, fastapi_app: FastAPI):
        self.app, self.fastapi_app = app, fastapi_app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            bridge = getattr(self.fastapi_app.state, "bridge", None)
            if bridge is not None:
                bridge.metrics.requests.labels(route, str(status)).inc()


def create_app(engine: Engine, limits: ServeLimits = ServeLimits(), options: ServeOptions = ServeOptions()) -> FastAPI:
    """The server for one engine; the engine's lifetime stays with the caller (see ``run.py``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.bridge = Bridge(engine, limits, asyncio.get_running_loop())
        yield

    app = FastAPI(title="sq-deploy", version=engine.info.name, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.limits, app.state.started = engine, limits, int(time.time())
    app.state.options = options
    app.include_router(openai.router)
    app.include_router(chat.router)
    app.include_router(kserve.router)

    @app.get("/metrics")
    async def metrics(request: Request):
        return Response(request.app.state.bridge.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/health")
    async def health(request: Request):
        return Response(status_code=503 if not serving(request) else 200)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return JSONResponse(
            error_body(request.url.path, exc.status, exc.message, exc.kind, exc.param), exc.status, headers=headers
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(request.url.path, exc.status_code, message, kind), exc.status_code)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, metrics count it

    # the last added runs first: count, authenticate, catch what escapes, bound the body, then the routes
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes, timeout_s=limits.body_timeout_s)
    app.add_middleware(InternalErrors)
    if options.api_key:
        app.add_middleware(RequireKey, key=options.api_key)
    app.add_middleware(CountRequests, fastapi_app=app)
    return app
