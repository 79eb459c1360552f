"""Next-token choice from the last position's logits: greedy, or temperature / top-k / top-p sampling.

Each request draws from its own seeded generator, so a seeded request gives the same
tokens whatever else shares its batch (up to the backend's floating-point noise).
Before choosing, :func:`constrain` applies the request's ``repetition_penalty`` and
``min_tokens`` as vLLM and Hugging Face do, so greedy output with a penalty matches
``model.generate(repetition_penalty=...)``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

import numpy as np

from sqdeploy.runtime.engine import SamplingParams


class History(Protocol):
    """What the constraints need to know about a request in flight (:class:`~sqdeploy.runtime.sequence.Sequence`)."""

    seen: Collection[int]  # distinct token ids of the prompt and the output so far
    tokens: list[int]  # generated token ids
    eos_ids: Collection[int]  # empty when ignore_eos


def needs_constraints(params: SamplingParams, history: History) -> bool:
    return params.repetition_penalty != 1.0 or (len(history.tokens) < params.min_tokens and bool(history.eos_ids))


def constrain(logits: np.ndarray, params: SamplingParams, history: History) -> np.ndarray:
    """A copy of one row of logits [V] with the repetition penalty applied and end of sequence masked
    while fewer than ``min_tokens`` tokens have been generated."""
    x = logits.astype(np.float32, copy=True)
    if params.repetition_penalty != 1.0 and history.seen:
        ids = np.fromiter(history.seen, dtype=np.int64)
        ids = ids[ids < x.shape[0]]
        v = x[ids]
        x[ids] = np.where(v > 0, v / params.repetition_penalty, v * params.repetition_penalty)
    if len(history.tokens) < params.min_tokens:
        eos = [i for i in history.eos_ids if i < x.shape[0]]
        x[eos] = -np.inf
    return x


def sample_row(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token from one row of float logits [V]."""
    if params.greedy:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / params.temperature
    if params.top_k and params.top_k < x.shape[0]:
        keep = np.argpartition(-x, params.top_k - 1)[: params.top_k]
    else:
        keep = np.arange(x.shape[0])
    order = keep[np.argsort(-x[keep], kind="stable")]
    p = np.exp(x[order] - x[order[0]])
    p /= p.sum()
    if params.top_p < 1.0:
        # smallest prefix whose mass reaches top_p (always at least one token)
        cut = int(np.searchsorted(np.cumsum(p), params.top_p)) + 1
        order, p = order[:cut], p[:cut] / p[:cut].sum()
    u = rng.random()
    idx = min(int(np.searchsorted(np.cumsum(p), u, side="right")), len(p) - 1)
    return int(order[idx])


def sample(
    logits: np.ndarray,
    params: list[SamplingParams],
    rngs: list[np.random.Generator],
    histories: Sequence[History] | None = None,
) -> list[int]:
    """Tokens for a batch of rows [B, V]; unconstrained greedy rows share one vectorised argmax."""
    greedy = np.argmax(logits, axis=-1)
    out = []
    for i, p in enumerate(params):
        row = logits[i]
        if histories is not None and needs_constraints(p, histories[i]):
            row = constrain(row, p, histories[i])
        elif p.greedy:
            out.append(int(greedy[i]))
            continue
        out.append(sample_row(row, p, rngs[i]))
    return out
