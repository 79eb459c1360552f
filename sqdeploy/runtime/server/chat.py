"""OpenAI chat completions: ``POST /v1/chat/completions``, plain or streamed as ``chat.completion.chunk`` events.

The messages become one prompt through the tokenizer's chat template
(``tokenizer.apply_chat_template``, with the generation prompt), or the template given
with ``sq-serve --chat-template FILE``; a model without either gets a 400 that says so.
The rendered text already holds the template's special tokens (BOS), so it is encoded
without adding them again, as vLLM does. Without ``max_tokens`` / ``max_completion_tokens``
the answer may use the rest of the context, up to the server's ``--max-new-tokens``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from sqdeploy.runtime.engine import InvalidRequestError, encode_prompt
from sqdeploy.runtime.server.bridge import EventStream
from sqdeploy.runtime.server.fields import build_requests
from sqdeploy.runtime.server.limits import bad_request
from sqdeploy.runtime.server.openai import ZERO_USAGE, collect, sse_error
from sqdeploy.runtime.server.schemas import ChatRequest, check_model, parse_body

router = APIRouter()


def render(tokenizer, body: ChatRequest, template: str | None) -> str:
    """The prompt text of a conversation, or a 400 naming the remedy when there is no template."""
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise bad_request(
            "this model has no chat template (its tokenizer_config.json defines none), so chat messages cannot be "
            "turned into a prompt; start sq-serve with --chat-template FILE (a Jinja chat template), "
            "or send a plain prompt to /v1/completions",
            "messages",
        )
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=body.add_generation_prompt
        )
    except Exception as exc:  # noqa: BLE001 - a template refusing the conversation (jinja's raise_exception) is the client's
        raise bad_request(f"the chat template cannot render these messages: {exc}", "messages") from None


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    st = request.app.state
    engine = st.engine
    body = parse_body(ChatRequest, await request.body())
    check_model(body, engine.info.name)
    text = render(engine.tokenizer, body, st.options.chat_template)
    try:
        ids = await asyncio.to_thread(encode_prompt, engine.tokenizer, text, engine.info.vocab_size, False)
    except InvalidRequestError as exc:
        raise bad_request(str(exc), "messages") from None
    room = max(1, engine.info.max_positions - len(ids))
    params = body.sampling(st.limits, default_max_tokens=min(st.limits.max_new_tokens, room))
    reqs = await build_requests(engine, [ids], params, st.limits)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    if body.stream:
        gen = st.bridge.open(reqs)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return EventStream(gen, _sse(gen, {**head, "object": "chat.completion.chunk"}, include_usage))
    finals, usage = await collect(st.bridge.open(reqs, request.receive))
    final = finals[reqs[0].request_id]
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": final.completion.text},
        "logprobs": None,
        "finish_reason": final.finish_reason,
    }
    return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": usage})


def _chunk(head: dict, delta: dict | None, finish_reason: str | None = None, usage: dict | None = None) -> str:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    body = {**head, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _sse(gen, head: dict, include_usage: bool):
    """OpenAI's chunks: the assistant role first, then one content delta per token, the finish reason,
    optional usage (no choices), ``[DONE]``."""
    usage = dict(ZERO_USAGE)
    yield _chunk(head, {"role": "assistant", "content": ""})

    def render(e) -> str:
        nonlocal usage
        if e.finish_reason == "error":
            return sse_error(f"generation failed: {e.error}", "server_error", 500)
        if e.completion is not None:
            usage = e.completion.usage
        return _chunk(head, {"content": e.text} if e.text or e.finish_reason is None else {}, e.finish_reason)

    async for text in gen.rendered(render, lambda exc: sse_error(exc.message, exc.kind, exc.status)):
        yield text
    if include_usage:
        yield _chunk(head, None, usage=usage)
    yield "data: [DONE]\n\n"
