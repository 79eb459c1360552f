"""What serving costs: the same engine offline and behind ``sq-serve``, at the same batch size, alternating.

The offline side is the offline benchmark's measurement (one batch of ``batch`` prompts
submitted together); the served side is a closed loop of ``batch`` streaming clients
against an ``sq-serve`` process started here. Rounds alternate between the two, so
that a change in the machine's load hits both alike; the ratio of the medians is the
share of offline throughput that survives HTTP, streaming and continuous batching.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.progress import Progress


@dataclass(frozen=True)
class OverheadConfig:
    batch: int = 8
    input_len: int = 128
    output_len: int = 128
    rounds: int = 5
    requests_per_round: int = 16
    threads: int | None = None
    seed: int = 0
    device: str = "cpu"
    kv_cache_gib: float | None = None
    gpu_memory_fraction: float | None = None
    tp: int | None = None
    prefill_tokens: int | None = None

    @property
    def max_prefill_tokens(self) -> int:
        """Prompt tokens per prefill step (default: one batch's prompts in one step), for the in-process
        engine and the server alike: the two must run the same schedule for their ratio to measure
        the server alone."""
        return self.prefill_tokens or max(4096, self.batch * self.input_len)

    def kernel_args(self, served: bool) -> tuple[float | None, float | None]:
        """(kv_cache_gib, gpu_memory_fraction) of one of the two engines sharing the GPU: with no fixed
        cache size, the in-process engine fills up to half the given share and the server the rest."""
        if self.kv_cache_gib is not None:
            return self.kv_cache_gib, None
        frac = self.gpu_memory_fraction or 0.9
        return None, frac if served else frac / 2


def _start_server(path: str, backend: str, cfg: OverheadConfig, port: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "sqdeploy.cli.serve",
        path,
        "--port",
        str(port),
        "--backend",
        backend,
        "--model-name",
        "bench",
        "--max-concurrent-requests",
        str(cfg.batch),
        "--max-prefill-tokens",
        str(cfg.max_prefill_tokens),
        "--log-level",
        "warning",
    ]
    if cfg.threads:
        cmd += ["--threads", str(cfg.threads)]
    if cfg.tp:
        cmd += ["--tp", str(cfg.tp)]
    gib, frac = cfg.kernel_args(served=True)
    cmd += ["--device", cfg.device, "--max-model-len", str(cfg.input_len + cfg.output_len)]
    cmd += ["--kv-cache-gib", str(gib)] if gib is not None else ["--gpu-memory-fraction", str(frac)]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SqDeployError(f"sq-serve {path} exited with code {proc.returncode}; see its error above")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SqDeployError(f"sq-serve {path} did not become ready in 300 s")


def measure_overhead(path: str, backend: str = "auto", cfg: OverheadConfig = OverheadConfig(), progress: bool = True) -> dict:
    from sqdeploy.runtime import BatchConfig, KernelOptions, open_engine
    from sqdeploy.runtime.bench.offline import _measure, prompts_for
    from sqdeploy.runtime.bench.online import LoadPoint, RequestSpec, run_point
    from sqdeploy.runtime.server.run import free_port

    gib, frac = cfg.kernel_args(served=False)
    engine = open_engine(path, backend, cfg.device, threads=cfg.threads,
                         batch=BatchConfig(cfg.batch, cfg.max_prefill_tokens),
                         kernel=KernelOptions(gib, frac, max_model_len=cfg.input_len + cfg.output_len), tp=cfg.tp)
    port = free_port()
    server = _start_server(path, backend, cfg, port)
    offline, served = [], []
    try:
        prompts = prompts_for(cfg.batch, cfg.input_len, engine.info.vocab_size, cfg.seed)
        specs = [RequestSpec(prompts[i % cfg.batch], cfg.output_len) for i in range(cfg.requests_per_round)]
        # Warm both sides up with a whole round: the server compiles and tunes its kernels for every batch
        # size the round reaches (rows finish at different steps), which one batch of requests does not cover.
        _measure(engine, prompts, cfg.output_len)
        asyncio.run(run_point(f"http://127.0.0.1:{port}", "bench", specs, LoadPoint("concurrency", cfg.batch)))
        with Progress(cfg.rounds, "offline vs served", progress) as bar:
            for _ in range(cfg.rounds):
                offline.append(_measure(engine, prompts, cfg.output_len)["tokens_per_s"])
                point = asyncio.run(run_point(f"http://127.0.0.1:{port}", "bench", specs, LoadPoint("concurrency", cfg.batch)))
                if point["failed"]:
                    raise SqDeployError(f"{point['failed']} served request(s) failed: {point['first_errors'][0]}")
                served.append(point["output_throughput"])
                bar.advance()
    finally:
        server.terminate()
        server.wait(timeout=120)
        engine.shutdown(drain=False)
    off, on = statistics.median(offline), statistics.median(served)
    return {
        "path": path,
        "backend": engine.info.backend,
        "config": cfg.__dict__,
        "offline_tokens_per_s": offline,
        "served_tokens_per_s": served,
        "offline_median": off,
        "served_median": on,
        "served_vs_offline": on / off,
        "per_round_ratio": [s / o for s, o in zip(served, offline)],
    }
