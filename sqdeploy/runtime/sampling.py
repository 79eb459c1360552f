"""Next-token choice from the last position's logits: greedy, or temperature / top-k / top-p sampling.

Each request draws from its own seeded generator, so a seeded request gives the same
tokens whatever else shares its batch (up to the backend's floating-point noise).
"""

from __future__ import annotations

import numpy as np

from .engine import SamplingParams


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


def sample(logits: np.ndarray, params: list[SamplingParams], rngs: list[np.random.Generator]) -> list[int]:
    """Tokens for a batch of rows [B, V]; greedy rows share one vectorised argmax."""
    greedy = np.argmax(logits, axis=-1)
    return [int(greedy[i]) if p.greedy else sample_row(logits[i], p, rngs[i]) for i, p in enumerate(params)]
