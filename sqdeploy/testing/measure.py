"""GPU timing done the way small kernels need it: CUDA graphs, device events, medians, cold weights.

A decode-sized GEMM runs for microseconds, less than it takes Python to launch it,
so every timed region is captured in a CUDA graph and replayed. Weight matrices that
fit in L2 would be timed from the cache; callers pass several copies of the weights
(``copies_for``) and each replay walks through all of them, as a model does.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch


def copies_for(nbytes: int, l2_bytes: int, cap: int = 16) -> int:
    """Enough copies of an operand that cycling through them touches at least 3x the L2."""
    return max(1, min(cap, -(-3 * l2_bytes // max(1, nbytes))))


def l2_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 50 * 2**20))


@torch.no_grad()
def graph_ms(fns: list[Callable[[], object]], reps: int = 20, trials: int = 3) -> float:
    """Median over ``trials`` of the mean time (ms) of one call in ``fns``, all replayed from one CUDA graph."""
    graph = _capture(fns)
    times = [_replay_ms(graph, reps) / len(fns) for _ in range(trials)]
    del graph
    return statistics.median(times)


def _replay_ms(graph: torch.cuda.CUDAGraph, reps: int) -> float:
    """Mean time (ms) of one replay of ``graph`` over ``reps`` back-to-back replays."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _capture(fns: list[Callable[[], object]]) -> torch.cuda.CUDAGraph:
    for f in fns:  # eager first: kernel tuning and allocations stay out of the capture
        f()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    return graph


@torch.no_grad()
def interleaved_ms(variants: dict[str, list[Callable[[], object]]], reps: int = 20, trials: int = 7) -> dict[str, float]:
    """Like :func:`graph_ms` for several variants, trials taken in turn (A B C A B C ...), so that
    clock and temperature drift during the run falls on every variant alike. Median per variant."""
    graphs = {name: _capture(fns) for name, fns in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(trials):
        for name, graph in graphs.items():
            times[name].append(_replay_ms(graph, reps) / len(variants[name]))
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def event_ms(fn: Callable[[], object], reps: int = 5, warmup: int = 2) -> float:
    """Median of single timed calls (for work long enough that launches do not matter)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read plus written per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = event_ms(lambda: dst.copy_(src), reps=10, warmup=3)
    return 2 * nbytes / (ms * 1e-3)


def matmul_rate(n: int = 8192, dtype=torch.float16) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = event_ms(lambda: a @ b, reps=10, warmup=3)
    return 2 * n**3 / (ms * 1e-3)
