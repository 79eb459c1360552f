"""OpenAI-compatible completions: ``POST /v1/completions`` (plain or server-sent events) and ``GET /v1/models``.

Request bodies are validated by :mod:`.schemas`: unknown fields, wrong types and the
OpenAI fields this server cannot honour (``n`` > 1, ``logprobs``, penalties, ``suffix``)
are a 400 naming the field, never silently ignored. Chat is in :mod:`.chat`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from sqdeploy.runtime.server.bridge import EventStream
from sqdeploy.runtime.server.fields import build_requests
from sqdeploy.runtime.server.limits import RequestError, error_body
from sqdeploy.runtime.server.schemas import CompletionRequest, check_model, parse_body

router = APIRouter()

ZERO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


@router.get("/v1/models")
async def models(request: Request):
    info = request.app.state.engine.info
    card = {
        "id": info.name,
        "object": "model",
        "created": request.app.state.started,
        "owned_by": "sq-deploy",
        "root": str(info.path),
        "max_model_len": info.max_positions,
    }
    return {"object": "list", "data": [card]}


async def collect(gen) -> tuple[dict[int, Any], dict[str, int]]:
    """Run a plain (non-streamed) generation to its end: each request's final event, and the summed usage."""
    finals: dict[int, Any] = {}
    usage = dict(ZERO_USAGE)
    async with gen:
        async for e in gen.events():
            if e.finish_reason is None:
                continue
            if e.finish_reason == "error":
                raise RequestError(500, f"generation failed: {e.error}", kind="server_error")
            finals[e.request_id] = e
            for k, v in e.completion.usage.items():
                usage[k] += v
    return finals, usage


@router.post("/v1/completions")
async def completions(request: Request):
    st = request.app.state
    body = parse_body(CompletionRequest, await request.body())
    check_model(body, st.engine.info.name)
    params = body.sampling(st.limits)
    prompts = body.prompts()
    reqs = await build_requests(st.engine, prompts, params, st.limits)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": body.model}
    prefix = [_echo_text(st.engine, p) if body.echo else "" for p in prompts]
    if body.stream:
        gen = st.bridge.open(reqs)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return EventStream(gen, _sse(gen, head, prefix, include_usage))
    finals, usage = await collect(st.bridge.open(reqs, request.receive))
    choices = [
        {
            "index": i,
            "text": prefix[i] + finals[r.request_id].completion.text,
            "logprobs": None,
            "finish_reason": finals[r.request_id].finish_reason,
        }
        for i, r in enumerate(reqs)
    ]
    return JSONResponse({**head, "choices": choices, "usage": usage})


def _echo_text(engine, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt, skip_special_tokens=True)


def _chunk(head: dict, choices: list, usage: dict | None = None) -> str:
    body = {**head, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _sse(gen, head: dict, prefix: list[str], include_usage: bool):
    """Server-sent events as OpenAI sends them: one chunk per token (its text may be empty while a character
    is incomplete), the finish reason, optional usage, ``[DONE]``; benchmarks time tokens by chunks (those of
    events already queued go out in one send: :meth:`Generation.rendered`)."""
    index = {r.request_id: i for i, r in enumerate(gen.requests)}
    usage = dict(ZERO_USAGE)
    for i, text in enumerate(prefix):
        if text:
            yield _chunk(head, [{"index": i, "text": text, "logprobs": None, "finish_reason": None}])

    def render(e) -> str:
        if e.finish_reason == "error":
            return sse_error(f"generation failed: {e.error}", "server_error", 500)
        if e.completion is not None:
            for k, v in e.completion.usage.items():
                usage[k] += v
        return _chunk(head, [{"index": index[e.request_id], "text": e.text, "logprobs": None,
                              "finish_reason": e.finish_reason}])

    async for text in gen.rendered(render, lambda exc: sse_error(exc.message, exc.kind, exc.status)):
        yield text
    if include_usage:
        yield _chunk(head, [], usage)
    yield "data: [DONE]\n\n"


def sse_error(message: str, kind: str, status: int) -> str:
    """The event that ends a stream which cannot finish (vLLM's shape: OpenAI's error object, then ``[DONE]``)."""
    return f"data: {json.dumps(error_body('/v1', status, message, kind))}\n\n"
