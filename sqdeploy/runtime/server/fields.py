"""Strict reading of request fields: a wrong type or value is a 400 naming the field, never a crash."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from sqdeploy.runtime.engine import GenerationRequest, InvalidRequestError, SamplingParams, check_length, encode_prompt
from sqdeploy.runtime.server.limits import RequestError, ServeLimits, bad_request

MAX_JSON_DEPTH = 64


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_json(raw: bytes) -> dict[str, Any]:
    """A JSON object, or a 400: also for nesting deeper than any request needs (which would exhaust the stack)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON ({exc}); send a JSON object") from None
    except RecursionError:
        body = None
    if body is None or json_depth(body) > MAX_JSON_DEPTH:
        raise bad_request(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, not {type(body).__name__}")
    return body


def _name(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(v), type(v).__name__
    )


def get_int(body: dict, key: str, default: Any = None, lo: int | None = None, hi: int | None = None) -> Any:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad_request(f"'{key}' must be an integer, not {_name(v)}", key)
    if lo is not None and v < lo or hi is not None and v > hi:
        span = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise bad_request(f"'{key}' must be {span} (got {v})", key)
    return v


def get_float(body: dict, key: str, default: Any = None, lo: float | None = None, hi: float | None = None) -> Any:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad_request(f"'{key}' must be a number, not {_name(v)}", key)
    if lo is not None and v < lo or hi is not None and v > hi:
        raise bad_request(f"'{key}' must be between {lo} and {hi} (got {v})", key)
    return float(v)


def get_bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f"'{key}' must be true or false, not {_name(v)}", key)
    return v


def get_stops(body: dict, key: str) -> tuple[str, ...]:
    v = body.get(key)
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items) or len(items) > 16:
        raise bad_request(f"'{key}' must be a non-empty string or a list of at most 16 non-empty strings", key)
    return tuple(items)


def make_params(limits: ServeLimits, max_tokens: int, **kw: Any) -> SamplingParams:
    if max_tokens > limits.max_new_tokens:
        raise bad_request(
            f"max_tokens is {max_tokens} but this server allows at most {limits.max_new_tokens}; ask for fewer", "max_tokens"
        )
    try:
        return SamplingParams(max_new_tokens=max_tokens, **kw)
    except InvalidRequestError as exc:
        raise bad_request(str(exc)) from None


async def build_requests(
    engine,
    prompts: Sequence[str | list[int]],
    params: SamplingParams | list[SamplingParams],
    limits: ServeLimits,
    special_tokens: bool = True,
) -> list[GenerationRequest]:
    """Tokenize and check every prompt (one params or one per prompt); long texts are tokenized off the event loop."""
    plist = [params] * len(prompts) if isinstance(params, SamplingParams) else params
    total = sum(len(p) for p in prompts if isinstance(p, str))

    def encode() -> list[list[int]]:
        return [encode_prompt(engine.tokenizer, p, engine.info.vocab_size, special_tokens) for p in prompts]

    try:
        ids = await asyncio.to_thread(encode) if total > 4096 else encode()
        for x, p in zip(ids, plist):
            if len(x) > limits.max_prompt_tokens:
                raise RequestError(
                    400,
                    f"the prompt has {len(x)} tokens but this server accepts at most {limits.max_prompt_tokens}; shorten it",
                    "prompt",
                    "context_length_exceeded",
                )
            check_length(len(x), p, engine.info.max_positions)
    except InvalidRequestError as exc:
        raise bad_request(str(exc), "prompt") from None
    return [GenerationRequest(x, p) for x, p in zip(ids, plist)]
