"""Per-shape choice of launch configurations, made once by timing the candidates.

Triton's own autotuner is not used because the choice must be visible (the GPU
benchmark reports it), must never run inside a CUDA-graph capture, and must be
forceable in tests (the Triton interpreter on the CPU cannot time anything).
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
log = logging.getLogger(__name__)


class Tuner:
    """Chooses among ``candidates`` (dicts of kernel meta-parameters) per problem ``key``."""

    registry: dict[str, "Tuner"] = {}
    disabled: dict[str, set] = {}  # configurations a GPU self-check found wrong, per tuner

    @staticmethod
    def _family(cfg: dict) -> tuple:
        return tuple(sorted((k, v) for k, v in cfg.items() if k not in ("K_PER", "SPLIT_K")))

    @classmethod
    def disable(cls, name: str, cfg: dict) -> None:
        """Never choose this configuration again (in this process): it failed a correctness check."""
        cls.disabled.setdefault(name, set()).add(cls._family(cfg))

    @classmethod
    def usable(cls, name: str, cfg: dict) -> bool:
        return cls._family(cfg) not in cls.disabled.get(name, set())

    def __init__(self, name: str):
        self.name = name
        self.best: dict[tuple, dict] = {}
        self.timings: dict[tuple, list[tuple[dict, float]]] = {}
        self.forced: dict | None = None
        Tuner.registry[name] = self

    def run(self, key: tuple, candidates: Callable[[], list[dict]], launch: Callable[[dict], object]):
        """Launch with the best configuration for ``key`` and return what the launch returns;
        ``candidates`` is only called the first time."""
        if self.forced is not None:
            return launch(self.forced)
        cfg = self.best.get(key)
        if cfg is None:
            offered = candidates()
            cfg = self._choose(key, [c for c in offered if self.usable(self.name, c)] or offered[:1], launch)
        return launch(cfg)

    def _choose(self, key: tuple, candidates: list[dict], launch) -> dict:
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if len(candidates) == 1 or INTERPRET or capturing:
            # never time inside a graph capture: take the first candidate, do not remember it
            return candidates[0]
        results, error = [], None
        for cfg in candidates:
            try:
                ms = _time(lambda: launch(cfg))
            except Exception as e:  # noqa: BLE001 - a configuration the compiler rejects is skipped
                ms, error = float("inf"), e
                # e.g. a tile whose shared memory this GPU lacks, or PTX it cannot run: the others stay
                log.warning("%s %s: %s skipped on this GPU (%s: %s)", self.name, key, cfg, type(e).__name__,
                            str(e)[:200])
            results.append((cfg, float(ms)))
        best, ms = min(results, key=lambda r: r[1])
        if ms == float("inf"):
            raise error
        self.best[key], self.timings[key] = best, results
        return best


def _time(fn: Callable[[], object]) -> float:
    """Median ms of one call, launched back to back from a CUDA graph. Timing single launches between
    events (``do_bench``) counts the host's launch time whenever the kernel is shorter than it: on an
    H200, 4096x4096 INT4 products of 13-30 us all timed about 100 us that way, so the choice among them
    was noise. A call that cannot be captured is timed the plain way."""
    from triton.testing import do_bench, do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=5, return_mode="median")
    except Exception:  # noqa: BLE001 - e.g. a launch that synchronizes
        torch.cuda.synchronize()
        return do_bench(fn, warmup=5, rep=20, return_mode="median")


def chosen() -> dict[str, dict[str, dict]]:
    """Every choice made so far, ``{tuner: {key: config}}`` (for reports)."""
    return {name: {str(k): v for k, v in t.best.items()} for name, t in Tuner.registry.items()}
