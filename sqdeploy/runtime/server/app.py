"""The ASGI application: both protocols, metrics, the body-size limit and JSON errors everywhere."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine
from . import kserve, openai
from .bridge import Bridge
from .limits import RequestError, ServeLimits
from .metrics import CONTENT_TYPE


def error_body(path: str, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    """OpenAI's error object under /v1, KServe's ``{"error": message}`` elsewhere."""
    if path.startswith("/v1"):
        group = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": message, "type": group, "param": param, "code": kind}}
    return {"error": message}


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413, by Content-Length or while reading a chunked body."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._reject(scope, send)
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(scope, send)

    async def _reject(self, scope, send):
        body = json.dumps(
            error_body(scope["path"], 413, f"the request body exceeds the server's {self.limit} byte limit", "request_too_large")
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


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


def create_app(engine: Engine, limits: ServeLimits = ServeLimits()) -> FastAPI:
    """The server for one engine; the engine's lifetime stays with the caller (see ``run.py``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.bridge = Bridge(engine, limits, asyncio.get_running_loop())
        yield

    app = FastAPI(title="sq-deploy", version=engine.info.name, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.limits, app.state.started = engine, limits, int(time.time())
    app.include_router(openai.router)
    app.include_router(kserve.router)

    @app.get("/metrics")
    async def metrics(request: Request):
        return Response(request.app.state.bridge.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/health")
    async def health(request: Request):
        return Response(status_code=503 if request.app.state.bridge.draining else 200)

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

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        message = f"internal error ({type(exc).__name__}: {exc}); the server keeps serving"
        return JSONResponse(error_body(request.url.path, 500, message, "server_error"), 500)

    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    app.add_middleware(CountRequests, fastapi_app=app)
    return app
