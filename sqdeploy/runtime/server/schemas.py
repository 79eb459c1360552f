"""Typed request bodies of the OpenAI routes: every field is known, typed and checked, none silently dropped.

The models forbid unknown fields and do not coerce types (``"8"`` is not a number), so a
typo or a field from another API version is a 400 naming it. Fields of OpenAI's API that
this server cannot honour are declared, so that they are refused by name (while their
default values, which clients often send explicitly, are accepted). Beyond OpenAI, the
vLLM extensions ``top_k``, ``min_tokens``, ``repetition_penalty`` and ``ignore_eos`` are
honoured. ``seed: -1`` means no seed, as in vLLM.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sqdeploy.runtime.engine import InvalidRequestError, SamplingParams
from sqdeploy.runtime.server.limits import RequestError, ServeLimits, bad_request

MAX_STOPS = 16
_U64 = 2**64 - 1

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    """What both routes share: sampling, stopping and streaming."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(ge=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = 0
    seed: Annotated[int, Field(ge=-1, le=_U64)] | None = None
    stop: str | list[str] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI fields this server cannot honour: accepted at their defaults, refused otherwise
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None

    DEFAULTS: ClassVar[dict[str, tuple]] = {
        "n": (None, 1),
        "presence_penalty": (None, 0),
        "frequency_penalty": (None, 0),
        "logit_bias": (None, {}),
    }

    def unsupported(self) -> str | None:
        """The first field set to a value this server cannot honour."""
        for name, defaults in self.DEFAULTS.items():
            if getattr(self, name) not in defaults:
                return name
        return None

    def stops(self) -> tuple[str, ...]:
        items = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(items) > MAX_STOPS or not all(items):
            raise bad_request(f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} non-empty strings", "stop")
        return tuple(items)

    def sampling(self, limits: ServeLimits, default_max_tokens: int = 16) -> SamplingParams:
        """The engine's parameters; ``max_completion_tokens`` (OpenAI's newer name) or ``max_tokens`` bound the
        output, ``default_max_tokens`` when neither is sent."""
        new = getattr(self, "max_completion_tokens", None)
        if new is not None and self.max_tokens is not None and new != self.max_tokens:
            raise bad_request("'max_tokens' and 'max_completion_tokens' differ; send one of them", "max_completion_tokens")
        max_tokens = new or self.max_tokens or default_max_tokens
        if max_tokens > limits.max_new_tokens:
            raise bad_request(
                f"max_tokens is {max_tokens} but this server allows at most {limits.max_new_tokens}; ask for fewer",
                "max_tokens",
            )
        try:
            return SamplingParams(
                max_new_tokens=max_tokens,
                temperature=self.temperature,
                top_p=self.top_p or 1e-9,
                top_k=max(self.top_k, 0),
                seed=None if self.seed == -1 else self.seed,
                stop=self.stops(),
                ignore_eos=self.ignore_eos,
                min_tokens=self.min_tokens,
                repetition_penalty=self.repetition_penalty,
            )
        except InvalidRequestError as exc:
            raise bad_request(str(exc)) from None


class CompletionRequest(SamplingFields):
    prompt: str | TokenIds | Annotated[list[str | TokenIds], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    DEFAULTS: ClassVar[dict[str, tuple]] = {
        **SamplingFields.DEFAULTS,
        "suffix": (None, ""),
        "best_of": (None, 1),
        "logprobs": (None,),
    }

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatRequest(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    add_generation_prompt: bool = True
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None

    DEFAULTS: ClassVar[dict[str, tuple]] = {
        **SamplingFields.DEFAULTS,
        "logprobs": (None, False),
        "top_logprobs": (None, 0),
        "response_format": (None, {"type": "text"}),
        "tools": (None, []),
        "tool_choice": (None, "none"),
        "parallel_tool_calls": (None,),
        "functions": (None, []),
        "function_call": (None, "none"),
        "modalities": (None, ["text"]),
        "audio": (None,),
        "prediction": (None,),
        "reasoning_effort": (None,),
        "store": (None, False),
        "metadata": (None,),
        "service_tier": (None, "auto", "default"),
    }


# what a union's or list's error says in words, per top-level field
_SHAPES = {
    "prompt": "must be a string, a list of strings, a list of token ids (integers >= 0) or a list of such lists",
    "stop": f"must be a non-empty string or a list of at most {MAX_STOPS} non-empty strings",
    "messages": "must be a non-empty list of {role, content} messages (roles system, developer, user, assistant; "
    "content a string or a list of {type: text, text} parts)",
}
_TYPES = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "dict_type": "an object",
    "list_type": "an array",
    "model_type": "an object",
}


def _json_type(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(v), "null" if v is None else type(v).__name__
    )


def _message(err: dict) -> tuple[str, str | None]:
    loc, kind = err["loc"], err["type"]
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({err['msg'].removeprefix('Invalid JSON: ')}); send a JSON object", None
    if not loc:
        return f"the request body must be a JSON object, not {_json_type(err.get('input'))}", None
    field = str(loc[0])
    if kind == "extra_forbidden":
        return f"unknown field '{field}'; remove it (docs/serving.md lists the fields it accepts)", field
    if kind == "missing" and len(loc) == 1:
        return f"'{field}' is required", field
    if field in _SHAPES:
        return f"'{field}' {_SHAPES[field]}", field
    if kind in _TYPES:
        return f"'{field}' must be {_TYPES[kind]}, not {_json_type(err.get('input'))}", field
    path = field + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
    return f"'{path}': {err['msg'][0].lower()}{err['msg'][1:]}", field


def parse_body(model: type[SamplingFields], raw: bytes) -> SamplingFields:
    """The validated request, or a 400 naming the first offending field (pydantic's JSON parser also
    bounds nesting depth, so a deeply nested body is a 400 too)."""
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        message, field = _message(exc.errors(include_url=False)[0])
        raise bad_request(message, field) from None
    name = body.unsupported()
    if name is not None:
        raise bad_request(f"'{name}' is not supported by this server; leave it out or at its default", name)
    return body


def check_model(body: SamplingFields, served: str) -> None:
    if body.model != served:
        raise RequestError(
            404,
            f"the model '{body.model}' does not exist here; this server serves '{served}' (GET /v1/models)",
            "model",
            "model_not_found",
        )
