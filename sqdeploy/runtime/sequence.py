"""One request in flight: its generated tokens, its text and when it must stop.

Shared by every engine so that end-of-sequence, stop strings, length limits and
incremental detokenization behave the same whichever backend produced the tokens.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from sqdeploy.runtime.engine import Completion, EventSink, GenerationRequest, Timings, TokenEvent

# Tokens of the prompt decoded together with the first generated ones, so that a
# tokenizer that drops a word's leading space at the start of a string does not.
_CONTEXT_TOKENS = 5


def window_decoder(tokenizer):
    """``ids -> text`` as ``tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)``.

    For a fast (Rust) tokenizer that is exactly its ``backend_tokenizer.decode(ids, skip_special_tokens=True)``,
    which transformers calls after per-call Python checks that walk the ids; for the few ids of a
    detokenizer window those checks cost several times the decode itself, and a server detokenizes every
    row of every step on the thread that launches the next one. Other tokenizers keep ``decode``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and callable(getattr(backend, "decode", None)):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class IncrementalDetokenizer:
    """Text added by each new token, without ever emitting half of a multi-byte character.

    Decodes a short window of ids (``prefix`` .. end) and emits what it adds to the
    window's first part, the approach of text-generation-inference: byte-level BPE
    splits UTF-8 characters over tokens, which decode to U+FFFD until complete. The first
    part's text is kept while the window stays (a character split over several tokens).
    """

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self._decode = window_decoder(tokenizer)
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix = 0
        self.read = len(self.ids)
        self._before: str | None = None  # decode of ids[prefix:read], while the window stays

    def _first_part(self) -> str:
        if self._before is None:
            self._before = self._decode(self.ids[self.prefix : self.read])
        return self._before

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._first_part()
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            self._before = None
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self._first_part()
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        self._before = None
        return after[len(before) :] if len(after) > len(before) else ""


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class Sequence:
    """A request being generated; ``append`` turns a sampled token into the event to send."""

    def __init__(self, request: GenerationRequest, sink: EventSink, tokenizer, eos_ids: frozenset[int]):
        self.request = request
        self.params = request.params
        self.sink = sink
        self.eos_ids = frozenset() if request.params.ignore_eos else eos_ids
        self.tokens: list[int] = []
        self.seen: set[int] = set(request.prompt_ids) if request.params.repetition_penalty != 1.0 else set()
        self.text = ""
        self.emitted = 0  # characters of ``text`` already sent
        self.finish_reason: str | None = None
        self.timings = Timings(arrival=request.arrival)
        self.rng = np.random.default_rng(request.params.seed)
        self._detok = IncrementalDetokenizer(tokenizer, request.prompt_ids)
        self._cancel = threading.Event()

    @property
    def request_id(self) -> int:
        return self.request.request_id

    # -- called from any thread
    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # -- called by the engine's thread
    def append(self, token: int) -> TokenEvent:
        now = time.perf_counter()
        if self.timings.first_token is None:
            self.timings.first_token = now
        index = len(self.tokens)
        if token in self.eos_ids:
            return self.finish("stop", now)
        self.tokens.append(token)
        if self.params.repetition_penalty != 1.0:
            self.seen.add(token)
        delta = self._detok.push(token)
        if len(self.tokens) >= self.params.max_new_tokens:
            delta += self._detok.flush()
        self.text += delta
        if self.params.stop and len(self.tokens) >= self.params.min_tokens and self._hit_stop(len(delta)):
            return self.finish("stop", now, token)
        if len(self.tokens) >= self.params.max_new_tokens:
            return self.finish("length", now, token)
        hold = _stop_prefix_len(self.text, self.params.stop) if self.params.stop else 0
        out = self.text[self.emitted : len(self.text) - hold]
        self.emitted += len(out)
        return TokenEvent(self.request_id, token, out, index)

    def _hit_stop(self, added: int) -> bool:
        longest = max(len(s) for s in self.params.stop)
        start = max(0, len(self.text) - added - longest + 1)
        hits = [p for p in (self.text.find(s, start) for s in self.params.stop) if p >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def finish(self, reason: str, now: float | None = None, token: int | None = None, error: str | None = None) -> TokenEvent:
        """The final event: flushes held-back text (unless a stop string cut it) and records the completion."""
        self.finish_reason = reason
        self.timings.finished = time.perf_counter() if now is None else now
        if reason in ("length", "cancelled", "error") or (reason == "stop" and token is None):
            self.text += self._detok.flush() if reason != "error" else ""
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        completion = Completion(
            self.request_id, self.request.prompt_ids, list(self.tokens), self.text, reason, self.timings, error
        )
        index = len(self.tokens) - 1 if token is not None else len(self.tokens)
        return TokenEvent(self.request_id, token, out, index, reason, completion, error)
