"""Offline benchmark: the engine without HTTP, over batch sizes x input lengths x output lengths.

Every variant (engine directory) gets the same seeded prompts, exactly ``input_len``
tokens each, and generates exactly ``output_len`` tokens (end-of-sequence ignored), all
requests of a batch submitted together. Each variant runs in a fresh process by default,
so its peak memory is its own and no variant inherits another's warm caches.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median

import numpy as np

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.progress import Progress
from sqdeploy.runtime.bench.stats import PeakMemory


@dataclass(frozen=True)
class OfflineGrid:
    batch_sizes: tuple[int, ...] = (1, 8)
    input_lens: tuple[int, ...] = (128,)
    output_lens: tuple[int, ...] = (128,)
    repeat: int = 3
    warmup: int = 1
    seed: int = 0

    def points(self) -> list[tuple[int, int, int]]:
        return list(itertools.product(self.batch_sizes, self.input_lens, self.output_lens))


@dataclass(frozen=True)
class EngineSpec:
    path: str
    backend: str = "auto"
    device: str = "cpu"
    threads: int | None = None
    kv_cache_gib: float | None = None
    gpu_memory_fraction: float | None = None
    tp: int | None = None

    @property
    def label(self) -> str:
        return Path(self.path).name


def prompts_for(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Seeded token ids, identical for every variant of one run (ids below 16 are left out: special tokens)."""
    rng = np.random.default_rng([seed, batch, length])
    return rng.integers(16, vocab, size=(batch, length)).tolist()


def _measure(engine, prompts, out_len: int) -> dict:
    from sqdeploy.runtime import SamplingParams, generate

    t0 = time.perf_counter()
    done = generate(engine, prompts, SamplingParams(max_new_tokens=out_len, ignore_eos=True))
    wall = time.perf_counter() - t0
    if any(len(c.token_ids) != out_len for c in done):
        raise SqDeployError(
            f"a request stopped before {out_len} tokens ({done[0].finish_reason}); the benchmark needs fixed lengths"
        )
    ttft = [c.timings.ttft for c in done]
    tpot = [c.timings.tpot(out_len) for c in done if c.timings.tpot(out_len) is not None]
    return {
        "ttft_s": float(np.mean(ttft)),
        "tpot_s": float(np.mean(tpot)) if tpot else None,
        "e2e_s": wall,
        "tokens_per_s": len(prompts) * out_len / wall,
    }


def run_variant(spec: EngineSpec, grid: OfflineGrid, tick=lambda: None) -> dict:
    """All grid points of one engine in this process."""
    from sqdeploy.runtime import BatchConfig, KernelOptions, open_engine

    t0 = time.perf_counter()
    with PeakMemory() as mem:
        bs, longest = max(grid.batch_sizes), max(grid.input_lens)
        longest_out = max(grid.output_lens)
        # the kernel backend's cache holds the longest point (and no more), so the budget goes to batch slots
        kernel = KernelOptions(spec.kv_cache_gib, spec.gpu_memory_fraction, max_model_len=longest + longest_out)
        engine = open_engine(spec.path, spec.backend, spec.device, spec.threads, BatchConfig(bs, max(bs * longest, 4096)),
                             kernel=kernel, tp=spec.tp)
        load_s = time.perf_counter() - t0
        rows = []
        try:
            for batch, in_len, out_len in grid.points():
                if in_len + out_len > engine.info.max_positions:
                    raise SqDeployError(
                        f"input {in_len} + output {out_len} exceeds {spec.path}'s context of {engine.info.max_positions}"
                    )
                prompts = prompts_for(batch, in_len, engine.info.vocab_size, grid.seed)
                for _ in range(grid.warmup):
                    _measure(engine, prompts, min(out_len, 4))
                runs = [_measure(engine, prompts, out_len) for _ in range(grid.repeat)]
                row = {k: median([r[k] for r in runs]) if runs[0][k] is not None else None for k in runs[0]}
                rows.append({"batch_size": batch, "input_len": in_len, "output_len": out_len, **row, "runs": len(runs)})
                tick()
        finally:
            engine.shutdown(drain=False)
    gpu = _gpu_peak(engine)
    return {
        "label": spec.label,
        **asdict(spec),
        "engine_backend": engine.info.backend,
        "description": engine.info.description,
        "load_s": load_s,
        "peak_rss_mib": mem.peak / 2**20,
        "peak_gpu_mib": gpu,
        "rows": rows,
    }


def _gpu_peak(engine) -> float | None:
    backend = getattr(engine, "backend", None)
    if getattr(backend, "name", None) in ("torch", "kernel"):
        from sqdeploy.runtime.backends.torch import memory_bytes

        b = memory_bytes(backend)
        return None if b is None else b / 2**20
    return None


def run_offline(specs: list[EngineSpec], grid: OfflineGrid, isolate: bool = True, progress: bool = True) -> list[dict]:
    """Every variant, one after the other, each in its own process unless ``isolate`` is False."""
    results = []
    with Progress(len(specs) * len(grid.points()), "offline benchmark", progress) as bar:
        for spec in specs:
            bar.update(spec.label)
            results.append(_in_subprocess(spec, grid, bar.advance) if isolate else run_variant(spec, grid, bar.advance))
    return results


def _in_subprocess(spec: EngineSpec, grid: OfflineGrid, tick) -> dict:
    with tempfile.TemporaryDirectory(prefix="sq-bench-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"spec": asdict(spec), "grid": asdict(grid)}))
        proc = subprocess.Popen([sys.executable, "-m", __name__, str(job), str(out)], stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if line.strip() == "tick":
                tick()
        rc = proc.wait()
        result = json.loads(out.read_text()) if out.exists() else {}
    if rc != 0 or "error" in result:
        raise SqDeployError(result.get("error") or f"benchmarking {spec.path} failed (exit code {rc}); see the error above")
    return result


def _worker(job_path: str, out_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    g = job["grid"]
    grid = OfflineGrid(**{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()})
    try:
        result = run_variant(EngineSpec(**job["spec"]), grid, lambda: print("tick", flush=True))
    except SqDeployError as exc:
        result = {"error": str(exc)}
    Path(out_path).write_text(json.dumps(result))
    return 0 if "error" not in result else 2


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2]))
