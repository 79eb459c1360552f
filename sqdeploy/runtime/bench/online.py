"""Online benchmark: streamed completions against a running sq-serve or any OpenAI-compatible endpoint.

Load comes three ways: Poisson arrivals at fixed rates (requests per second, as the
SmoothQuant+ paper measures serving), a closed loop of N clients that each send the
next request as soon as the last one ends (a saturating load at batch size N), or a
JSONL trace replayed at its own arrival times. For every load point: throughput,
time to first token, inter-token latency and end-to-end latency percentiles, and
over the rates, the rate at which latency breaks down.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sqdeploy.core.errors import SqDeployError
from sqdeploy.runtime.bench.stats import percentiles


@dataclass
class RequestSpec:
    prompt: str | list[int]
    output_len: int
    arrival: float = 0.0  # seconds after the start of the load point


@dataclass
class RequestResult:
    sent: float
    chunks: list[float] = field(default_factory=list)
    done: float | None = None
    completion_tokens: int = 0
    error: str | None = None
    status: int | None = None  # the HTTP status when it was not 200


@dataclass(frozen=True)
class LoadPoint:
    kind: str  # "rate" | "concurrency" | "trace"
    value: float

    @property
    def label(self) -> str:
        if self.kind == "rate":
            return "all at once" if math.isinf(self.value) else f"{self.value:g} req/s"
        return f"{int(self.value)} clients" if self.kind == "concurrency" else "trace"


def read_trace(path: str | Path) -> list[RequestSpec]:
    """JSONL lines ``{"arrival_time": s, "prompt": "...", "output_len": n}`` (arrival times from the start)."""
    specs = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            specs.append(RequestSpec(row["prompt"], int(row["output_len"]), float(row["arrival_time"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise SqDeployError(
                f'{path}:{n}: a trace line must be {{"arrival_time": s, "prompt": text, "output_len": n}} ({exc})'
            ) from None
    if not specs:
        raise SqDeployError(f"{path} holds no requests")
    return sorted(specs, key=lambda s: s.arrival)


def synthetic_prompts(n: int, input_len: int, seed: int, tokenizer=None, corpus: str | None = None, vocab: int = 8192) -> list:
    """``n`` prompts of ``input_len`` tokens: windows of ``corpus`` text when a tokenizer is given, else token ids."""
    rng = np.random.default_rng(seed)
    if tokenizer is None:
        return rng.integers(16, vocab, size=(n, input_len)).tolist()
    ids = tokenizer(corpus or _default_corpus(), verbose=False).input_ids  # cut into prompts: no length warning
    if len(ids) <= input_len:
        raise SqDeployError(f"the prompt corpus has only {len(ids)} tokens; give a longer --corpus for --input-len {input_len}")
    starts = rng.integers(0, len(ids) - input_len, size=n)
    return [tokenizer.decode(ids[s : s + input_len]) for s in starts]


def _default_corpus() -> str:
    """sq-deploy's own source code: always present, and code like the models it is tuned for."""
    root = Path(__file__).resolve().parents[2]
    return "\n".join(p.read_text() for p in sorted(root.rglob("*.py")))


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]).tolist()


async def _send(client, url: str, model: str, spec: RequestSpec, ignore_eos: bool) -> RequestResult:
    body = {
        "model": model,
        "prompt": spec.prompt,
        "max_tokens": spec.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    res = RequestResult(sent=time.perf_counter())
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.status = r.status_code
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"])
                    break
                if obj.get("choices"):
                    res.chunks.append(time.perf_counter())
                if obj.get("usage"):
                    res.completion_tokens = int(obj["usage"]["completion_tokens"])
    except Exception as exc:  # noqa: BLE001 - counted as a failed request
        res.error = f"{type(exc).__name__}: {exc}"
    res.done = time.perf_counter()
    if not res.completion_tokens and res.error is None:
        res.completion_tokens = len(res.chunks)
    return res


async def run_point(
    url: str, model: str, specs: list[RequestSpec], point: LoadPoint, ignore_eos: bool = True, tick=lambda: None
) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits) as client:

        async def one(spec):
            r = await _send(client, url, model, spec, ignore_eos)
            tick()
            return r

        before = await engine_activity(client, url)
        start = time.perf_counter()
        if point.kind == "concurrency":
            todo = list(specs)
            results: list[RequestResult] = []

            async def worker():
                while todo:
                    results.append(await one(todo.pop(0)))

            await asyncio.gather(*(worker() for _ in range(int(point.value))))
        else:

            async def later(spec):
                await asyncio.sleep(max(0.0, start + spec.arrival - time.perf_counter()))
                return await one(spec)

            results = list(await asyncio.gather(*(later(s) for s in specs)))
        out = summarize(point, results, start)
        after = await engine_activity(client, url)
    if before and after and "clock_s" in after:  # a server that gives its engine's clock
        out["engine"] = activity_share(before, after)
    return out


async def engine_activity(client, url: str) -> dict[str, float] | None:
    """The engine worker's counters from sq-serve's ``/metrics``; None from a server without them."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        r = await client.get(f"{url}/metrics")
        r.raise_for_status()
    except Exception:  # noqa: BLE001 - another server, or metrics behind a key: the point stands without
        return None
    prefix = "sqdeploy_engine_"
    return {fam.name[len(prefix):].replace("_seconds", "_s"): s.value for fam in text_string_to_metric_families(r.text)
            if fam.name.startswith(prefix) for s in fam.samples if s.name.endswith("_total")} or None


def activity_share(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Where the engine worker's time went between two readings (:meth:`BatchingEngine.activity`, or
    sq-serve's metrics): fractions of the window between them by the engine's own clock, its mean
    step, and the mean rows per decode step. A served run that is idle waits for its clients, one
    that is busy but slower than offline pays per step."""
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    wall_s = delta["clock_s"]
    out = {f"{k[:-2]}_fraction": delta[k] / wall_s for k in ("step_s", "deliver_s", "idle_s") if k in delta}
    if delta.get("steps"):
        out["ms_per_step"] = 1e3 * delta.get("step_s", 0.0) / delta["steps"]
        out["steps"] = delta["steps"]
    if delta.get("decode_steps"):
        out["rows_per_decode_step"] = delta.get("decode_rows", 0.0) / delta["decode_steps"]
        out["decode_steps"] = delta["decode_steps"]
    if delta.get("prefill_batches"):
        out["prefill_batches"] = delta["prefill_batches"]
    return out


def summarize(point: LoadPoint, results: list[RequestResult], start: float) -> dict[str, Any]:
    ok = [r for r in results if r.error is None and r.chunks]
    end = max((r.done for r in results if r.done), default=start)
    duration = max(end - start, 1e-9)
    tokens = sum(r.completion_tokens for r in ok)
    itl = [b - a for r in ok for a, b in zip(r.chunks, r.chunks[1:])]
    # a 429 is the server shedding load past its queue (sq-serve, vLLM, TGI alike): counted apart from errors
    rejected = [r for r in results if r.status == 429]
    errors = [r.error for r in results if r.error is not None and r.status != 429]
    return {
        "load": point.kind,
        "value": point.value,
        "label": point.label,
        "requests": len(results),
        "failed": len(errors),
        "rejected": len(rejected),
        "first_errors": errors[:3],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_tokens": tokens,
        "output_throughput": tokens / duration,
        "ttft_s": percentiles([r.chunks[0] - r.sent for r in ok]),
        "itl_s": percentiles(itl),
        "e2e_s": percentiles([r.done - r.sent for r in ok]),
    }


def breakdown_rate(points: list[dict], factor: float = 4.0) -> dict[str, Any]:
    """The lowest offered rate whose median TTFT is ``factor`` times the lowest rate's.

    Requests that queue show up first in the time to their first token; a server that
    keeps up holds it near the unloaded value however many requests arrive.
    """
    rated = sorted((p for p in points if p["load"] == "rate" and not math.isinf(p["value"])), key=lambda p: p["value"])
    if len(rated) < 2:
        return {"rate": None, "reason": "needs at least two finite --rates"}
    base = rated[0]["ttft_s"]["p50"]
    for p in rated[1:]:
        if base and p["ttft_s"]["p50"] and p["ttft_s"]["p50"] > factor * base:
            return {
                "rate": p["value"],
                "reason": f"median TTFT {1000 * p['ttft_s']['p50']:.0f} ms, over {factor:g}x "
                f"the {1000 * base:.0f} ms at {rated[0]['value']:g} req/s",
            }
    return {"rate": None, "reason": f"median TTFT stayed under {factor:g}x up to {rated[-1]['value']:g} req/s"}


def resolve_model(url: str, model: str | None) -> str:
    if model:
        return model
    import httpx

    try:
        data = httpx.get(f"{url}/v1/models", timeout=30).json()
        return data["data"][0]["id"]
    except Exception as exc:  # noqa: BLE001 - any failure means: ask the user
        raise SqDeployError(f"could not list the models at {url}/v1/models ({type(exc).__name__}); pass --model NAME") from None
