"""Summaries and a memory watcher shared by the offline and online benchmarks."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import numpy as np


def percentiles(values: Sequence[float], qs=(50, 90, 99)) -> dict[str, float | None]:
    """``{"p50": ..., "p90": ..., "p99": ..., "mean": ...}`` (None when there are no values)."""
    if not values:
        return {**{f"p{q}": None for q in qs}, "mean": None}
    a = np.asarray(values, dtype=np.float64)
    return {**{f"p{q}": float(np.percentile(a, q)) for q in qs}, "mean": float(a.mean())}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak resident memory of this process while the block runs, sampled every ``interval`` s.

    The offline benchmark runs each variant in a fresh process, so the peak is that
    variant's alone (weights, runtime buffers and KV cache), not what an earlier one left.
    """

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
