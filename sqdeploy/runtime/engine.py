"""The generation-engine interface every backend is served and benchmarked through.

A request is a prompt (text or token ids) plus :class:`SamplingParams`; what comes
back is a stream of :class:`TokenEvent` (one per generated token, the last one
carrying the finish reason) and, at the end, a :class:`Completion` with tokens,
text and timings. The HTTP server, ``sq-bench`` and tests all talk to an
:class:`Engine`, so a backend only has to implement one model step (see
``backends/``) or, for runtimes that batch on their own (TensorRT-LLM), this
interface directly.
"""

from __future__ import annotations

import itertools
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sqdeploy.core.errors import SqDeployError

FINISH_REASONS = ("stop", "length", "cancelled", "error")


class InvalidRequestError(SqDeployError):
    """A request the engine refuses (bad sampling values, prompt too long); servers answer it with a 4xx."""


@dataclass(frozen=True)
class SamplingParams:
    """How to continue one prompt. ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 disable those filters.

    ``ignore_eos`` keeps generating past the end-of-sequence token, so benchmarks get the
    output length they asked for. ``min_tokens`` and ``repetition_penalty`` mean what they
    mean in vLLM (and Hugging Face's ``min_new_tokens`` / ``repetition_penalty``): no end of
    sequence and no stop string before ``min_tokens`` tokens; the logit of every token already
    in the prompt or the output divided by the penalty when positive, multiplied when negative.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1 (got {self.max_new_tokens})"),
            (self.temperature >= 0, f"temperature must be >= 0 (got {self.temperature}); use 0 for greedy decoding"),
            (self.top_k >= 0, f"top_k must be >= 0 (got {self.top_k}); 0 disables it"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p}); 1 disables it"),
            (all(isinstance(s, str) and s for s in self.stop), "stop sequences must be non-empty strings"),
            (
                0 <= self.min_tokens <= self.max_new_tokens,
                f"min_tokens must be between 0 and max_tokens ({self.max_new_tokens}) (got {self.min_tokens})",
            ),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0 (got {self.repetition_penalty}); 1 disables it"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InvalidRequestError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class Timings:
    """Wall-clock marks of one request (``time.perf_counter`` seconds)."""

    arrival: float = 0.0
    scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival

    def tpot(self, tokens: int) -> float | None:
        """Mean time per output token after the first."""
        if self.finished is None or self.first_token is None or tokens < 2:
            return None
        return (self.finished - self.first_token) / (tokens - 1)

    def to_dict(self, tokens: int) -> dict[str, float | None]:
        queue_time = None if self.scheduled is None else self.scheduled - self.arrival
        return {"queue_s": queue_time, "ttft_s": self.ttft, "tpot_s": self.tpot(tokens), "e2e_s": self.e2e}


@dataclass
class TokenEvent:
    """One generated token of one request; ``text`` is the printable text it adds (may be empty).

    The final event of a request has ``finish_reason`` set; it may carry no token
    (``token_id`` None) when the request ends without producing one (stop, cancel, error).
    """

    request_id: int
    token_id: int | None
    text: str
    index: int
    finish_reason: str | None = None
    completion: Completion | None = None
    error: str | None = None


@dataclass
class Completion:
    request_id: int
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    timings: Timings
    error: str | None = None

    @property
    def usage(self) -> dict[str, int]:
        p, c = len(self.prompt_ids), len(self.token_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


EventSink = Callable[[list[TokenEvent]], None]

_request_ids = itertools.count(1)


@dataclass
class GenerationRequest:
    """A prompt (already tokenized) and its sampling parameters; ids are unique in the process."""

    prompt_ids: list[int]
    params: SamplingParams
    request_id: int = field(default_factory=lambda: next(_request_ids))
    arrival: float = field(default_factory=time.perf_counter)


class RequestHandle(Protocol):
    request_id: int

    def cancel(self) -> None: ...


@dataclass(frozen=True)
class EngineInfo:
    """What a server or a benchmark needs to know about the model behind an engine."""

    name: str
    path: Path
    backend: str
    description: str
    max_positions: int
    vocab_size: int


class Engine(Protocol):
    """Continuous-batching generation. ``submit`` is thread-safe and never blocks on the model."""

    info: EngineInfo
    tokenizer: object

    def submit(self, requests: Sequence[GenerationRequest], sink: EventSink) -> list[RequestHandle]:
        """Queue requests together (they may share one prefill); ``sink`` gets each step's events in order."""
        ...

    def stats(self) -> dict[str, int]:
        """``waiting`` and ``running`` request counts."""
        ...

    def shutdown(self, drain: bool = True) -> None: ...


def encode_prompt(tokenizer, prompt: str | Sequence[int], vocab_size: int, special_tokens: bool = True) -> list[int]:
    """Token ids of a text prompt, or validated ids.

    ``special_tokens`` adds the tokenizer's default ones (BOS); a rendered chat template
    already holds them, so chat prompts are encoded without.
    """
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt, add_special_tokens=special_tokens).input_ids)
    else:
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is outside the vocabulary [0, {vocab_size}); send ids the model's tokenizer produced"
            )
    if not ids:
        raise InvalidRequestError("the prompt is empty; send at least one token")
    return ids


def check_length(prompt_len: int, params: SamplingParams, max_positions: int) -> None:
    if prompt_len + params.max_new_tokens > max_positions:
        raise InvalidRequestError(
            f"the model's context is {max_positions} tokens, but the prompt has {prompt_len} and up to "
            f"{params.max_new_tokens} new tokens were requested; shorten the prompt or lower max_tokens"
        )


class _QueueSink:
    def __init__(self):
        self.q: queue.Queue[TokenEvent] = queue.Queue()

    def __call__(self, events: list[TokenEvent]) -> None:
        for e in events:
            self.q.put(e)


def generate(
    engine: Engine, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
) -> list[Completion]:
    """Blocking batch generation: all prompts are submitted together and run as one batch when they fit."""
    plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    reqs = []
    for prompt, p in zip(prompts, plist):
        ids = encode_prompt(engine.tokenizer, prompt, engine.info.vocab_size)
        check_length(len(ids), p, engine.info.max_positions)
        reqs.append(GenerationRequest(ids, p))
    sink = _QueueSink()
    engine.submit(reqs, sink)
    done: dict[int, Completion] = {}
    while len(done) < len(reqs):
        e = sink.q.get()
        if e.finish_reason is not None:
            done[e.request_id] = e.completion
    return [done[r.request_id] for r in reqs]


def stream(engine: Engine, prompt: str | Sequence[int], params: SamplingParams) -> Iterator[TokenEvent]:
    """Blocking token-by-token iterator over one request; closing it early cancels the request."""
    ids = encode_prompt(engine.tokenizer, prompt, engine.info.vocab_size)
    check_length(len(ids), params, engine.info.max_positions)
    sink = _QueueSink()
    (handle,) = engine.submit([GenerationRequest(ids, params)], sink)
    finished = False
    try:
        while not finished:
            e = sink.q.get()
            finished = e.finish_reason is not None
            yield e
    finally:
        if not finished:
            handle.cancel()
