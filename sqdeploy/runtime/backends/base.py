"""What a step backend provides to the continuous-batching scheduler.

A backend runs one forward pass over a left-padded batch with a KV cache and knows
how to rearrange its own cache (keep some rows, pad on the left, stack batches); the
scheduler does everything else (who runs, sampling, stopping). The cache is a list of
per-layer arrays ``[batch, kv_heads, length, head_dim]`` (keys and values
interleaved), numpy for ONNX Runtime on CPU and torch tensors for the reference model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

Cache = Any


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    description: str
    vocab_size: int
    max_positions: int
    num_layers: int
    eos_ids: frozenset[int]
    pad_id: int
    tokenizer_path: Path


class StepBackend(Protocol):
    name: str
    info: ModelInfo

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: Cache | None
    ) -> tuple[np.ndarray, Cache]:
        """Float32 logits of the last position [B, V] and the cache extended by this step's tokens.

        ``input_ids``/``position_ids`` are int64 [B, T]; ``attention_mask`` is int64 [B, past + T]
        with 1 for real tokens (left padding allowed); ``cache`` None means past length 0.
        """
        ...

    def take(self, cache: Cache, rows: Sequence[int]) -> Cache: ...

    def pad_left(self, cache: Cache, n: int) -> Cache: ...

    def concat(self, caches: Sequence[Cache]) -> Cache: ...

    def trim(self, cache: Cache, start: int) -> Cache:
        """Drop the first ``start`` positions (columns no remaining row uses)."""
        ...


class NumpyCacheOps:
    """Cache rearrangement for caches held as numpy arrays."""

    def take(self, cache: list[np.ndarray], rows: Sequence[int]) -> list[np.ndarray]:
        idx = np.asarray(rows, dtype=np.int64)
        return [c[idx] for c in cache]

    def pad_left(self, cache: list[np.ndarray], n: int) -> list[np.ndarray]:
        if n == 0:
            return cache
        return [np.concatenate([np.zeros((c.shape[0], c.shape[1], n, c.shape[3]), c.dtype), c], axis=2) for c in cache]

    def concat(self, caches: Sequence[list[np.ndarray]]) -> list[np.ndarray]:
        return [np.concatenate(layer, axis=0) for layer in zip(*caches)]

    def trim(self, cache: list[np.ndarray], start: int) -> list[np.ndarray]:
        return cache if start == 0 else [np.ascontiguousarray(c[:, :, start:]) for c in cache]


def eos_ids_of(*candidates: Any) -> frozenset[int]:
    """End-of-sequence ids from config values (an int, a list, or None) and the tokenizer."""
    ids: set[int] = set()
    for c in candidates:
        if isinstance(c, int):
            ids.add(c)
        elif isinstance(c, (list, tuple)):
            ids.update(int(x) for x in c)
    return frozenset(ids)


def load_tokenizer(path: Path):
    """The engine's tokenizer, refused if it differs from the one recorded when the directory was written."""
    from sqdeploy.core.integrity import verify_recorded_files
    from sqdeploy.model.tokenizer import load_tokenizer as _load

    verify_recorded_files(path)
    return _load(path)
