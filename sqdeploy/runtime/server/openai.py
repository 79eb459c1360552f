"""OpenAI-compatible completions: ``POST /v1/completions`` (plain or server-sent events) and ``GET /v1/models``.

Beyond OpenAI's fields it takes ``top_k`` and ``ignore_eos`` (as vLLM does). Fields
this server cannot honour (``n`` > 1, ``logprobs``, penalties, ``suffix``) are refused
with a 400 naming them, rather than silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .bridge import EventStream
from .fields import build_requests, get_bool, get_float, get_int, get_stops, make_params, parse_json
from .limits import RequestError, bad_request

router = APIRouter()


def _prompts(body: dict) -> list[str | list[int]]:
    p = body.get("prompt")
    ok_ids = lambda x: isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
    if isinstance(p, str) or ok_ids(p):
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, str) or ok_ids(x) for x in p):
        return list(p)
    raise bad_request("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists", "prompt")


def _check_unsupported(body: dict) -> None:
    unsupported = [
        ("n", lambda v: v not in (None, 1)),
        ("best_of", lambda v: v not in (None, 1)),
        ("logprobs", lambda v: v is not None),
        ("suffix", lambda v: v not in (None, "")),
        ("presence_penalty", lambda v: v not in (None, 0)),
        ("frequency_penalty", lambda v: v not in (None, 0)),
        ("logit_bias", lambda v: v not in (None, {})),
    ]
    for key, bad in unsupported:
        if key in body and bad(body[key]):
            raise bad_request(f"'{key}'={body[key]!r} is not supported by this server; leave it at its default", key)


def _params(body: dict, limits):
    top_k = get_int(body, "top_k", 0, lo=-1)
    return make_params(
        limits,
        get_int(body, "max_tokens", 16, lo=1),
        temperature=get_float(body, "temperature", 1.0, 0.0, 2.0),
        top_p=get_float(body, "top_p", 1.0, 0.0, 1.0) or 1e-9,
        top_k=max(top_k, 0),
        seed=get_int(body, "seed", None),
        stop=get_stops(body, "stop"),
        ignore_eos=get_bool(body, "ignore_eos"),
    )


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


@router.post("/v1/completions")
async def completions(request: Request):
    st = request.app.state
    body = parse_json(await request.body())
    model = body.get("model")
    if not isinstance(model, str):
        raise bad_request("'model' is required and must be a string", "model")
    if model != st.engine.info.name:
        raise RequestError(
            404,
            f"the model '{model}' does not exist here; this server serves '{st.engine.info.name}' (GET /v1/models)",
            "model",
            "model_not_found",
        )
    _check_unsupported(body)
    prompts = _prompts(body)
    params = _params(body, st.limits)
    echo, stream = get_bool(body, "echo"), get_bool(body, "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    reqs = await build_requests(st.engine, prompts, params, st.limits)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model}
    prefix = [_echo_text(st.engine, p) if echo else "" for p in prompts]
    gen = st.bridge.open(reqs)
    if stream:
        return EventStream(gen, _sse(gen, head, prefix, bool(opts.get("include_usage"))))
    index = {r.request_id: i for i, r in enumerate(reqs)}
    choices: list[dict[str, Any]] = [{}] * len(reqs)
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    async with gen:
        async for e in gen.events():
            if e.finish_reason is None:
                continue
            if e.finish_reason == "error":
                raise RequestError(500, f"generation failed: {e.error}", kind="server_error")
            i = index[e.request_id]
            choices[i] = {"index": i, "text": prefix[i] + e.completion.text, "logprobs": None, "finish_reason": e.finish_reason}
            for k, v in e.completion.usage.items():
                usage[k] += v
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
    is incomplete), the finish reason, optional usage, ``[DONE]``; benchmarks time tokens by chunks."""
    index = {r.request_id: i for i, r in enumerate(gen.requests)}
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    try:
        for i, text in enumerate(prefix):
            if text:
                yield _chunk(head, [{"index": i, "text": text, "logprobs": None, "finish_reason": None}])
        async for e in gen.events():
            if e.finish_reason == "error":
                yield f"data: {json.dumps({'error': {'message': f'generation failed: {e.error}', 'type': 'server_error'}})}\n\n"
                continue
            yield _chunk(
                head, [{"index": index[e.request_id], "text": e.text, "logprobs": None, "finish_reason": e.finish_reason}]
            )
            if e.completion is not None:
                for k, v in e.completion.usage.items():
                    usage[k] += v
    except RequestError as exc:
        yield f"data: {json.dumps({'error': {'message': exc.message, 'type': exc.kind, 'code': exc.status}})}\n\n"
    if include_usage:
        yield _chunk(head, [], usage)
    yield "data: [DONE]\n\n"
