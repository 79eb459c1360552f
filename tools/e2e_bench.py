"""End-to-end part of tools/gpu_bench.py: a 7B-shaped model per variant, and the tensor-parallel smoke run."""

from __future__ import annotations

import gc
import statistics

import torch

from sqdeploy.kernels import GraphDecoder
from sqdeploy.testing.measure import event_ms
from sqdeploy.testing.random_weights import VARIANTS, random_model, weight_bytes

PROMPT, STEPS, TRIALS = 128, 32, 3
CATEGORIES = (
    ("int8 GEMM (Triton)", ("_int8_",)),
    ("int4 GEMM (Triton)", ("_int4_",)),
    ("attention", ("flash", "fmha", "attention", "efficient", "sdpa", "_decode_attn")),
    ("norm (+quant)", ("_add_norm",)),
    ("act*mul (+quant)", ("_act_mul",)),
    ("rope + cache write", ("_rope_cache",)),
    ("cuBLAS GEMM", ("gemm", "gemv", "sm90", "cutlass", "nvjet", "xmma", "cublas", "splitk")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other (argmax, masks, copies)"


@torch.no_grad()
def profile(fn, by_kernel: bool = False) -> dict[str, float]:
    """Kernel time (ms) per category (or per kernel name) for one call of ``fn``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity

    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in prof.events():
        if getattr(e, "device_type", None) != DeviceType.CUDA:
            continue
        us = getattr(e, "device_time", None)
        if us is None:
            us = getattr(e, "cuda_time", 0.0)
        key = e.name[:80] if by_kernel else category(e.name)
        out[key] = out.get(key, 0.0) + us / 1000.0
    return {k: round(v, 4) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


@torch.no_grad()
def decode_ms(model, batch: int, vocab: int) -> tuple[float, GraphDecoder]:
    dec = GraphDecoder(model, batch, PROMPT + STEPS * (TRIALS + 1) + 8)
    dec.prefill(torch.randint(0, vocab, (batch, PROMPT), device="cuda"))
    dec.capture()
    for _ in range(STEPS):  # warm
        dec.graph.replay()
    times = []
    for _ in range(TRIALS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(STEPS):
            dec.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / STEPS)
    return statistics.median(times), dec


def run_e2e(cfg, quick: bool = False) -> dict:
    """All four variants are built side by side (about 32 GB) so that the prefill trials can be
    interleaved: clock and temperature drift then falls on every variant alike."""
    variants = ("fp16", "w8a8", "w8a8-token", "w4a16")
    res = {"model": "llama2-7b shapes, random weights", "prompt_tokens_for_decode": PROMPT,
           "decode_steps_timed": STEPS, "prefill_tokens": 2048, "variants": {v: {} for v in variants}}
    models = {}
    for v in variants:
        base = torch.cuda.memory_allocated()
        models[v] = random_model(cfg, VARIANTS[v], "cuda")
        torch.cuda.synchronize()
        res["variants"][v].update(weight_bytes=weight_bytes(models[v]),
                                  allocated_bytes=torch.cuda.memory_allocated() - base)
    ids = torch.randint(0, cfg.vocab_size, (1, 2048), device="cuda")
    prefill, graphed = _prefill_trials(models, ids, quick)
    for v in variants:
        r = res["variants"][v]
        r["prefill_2048_ms"] = statistics.median(prefill[v])
        r["prefill_2048_trials_ms"] = [round(x, 3) for x in prefill[v]]
        if graphed.get(v):
            r["prefill_2048_graph_ms"] = statistics.median(graphed[v])
            r["prefill_2048_graph_trials_ms"] = [round(x, 3) for x in graphed[v]]
        r["prefill_profile_ms"] = _safe(lambda m=models[v]: profile(lambda: m(ids, last_only=True)))
        try:
            r["decode"] = _decode_all(models[v], cfg, quick, r)
        except Exception:  # noqa: BLE001 - one broken variant must not cost the others
            import traceback

            res.setdefault("errors", {})[v] = traceback.format_exc()[-2000:]
            print(res["errors"][v], flush=True)
        print(f"   e2e {v}: {r['prefill_2048_ms']:.1f} ms prefill, decode {r.get('decode')}", flush=True)
    del models
    gc.collect()
    torch.cuda.empty_cache()
    return res


@torch.no_grad()
def _prefill_trials(models: dict, ids: torch.Tensor, quick: bool) -> tuple[dict, dict]:
    """Prefill wall time per variant, eager (``model(ids)``: one Python launch per kernel) and replayed
    from a CUDA graph (:class:`GraphedForward`: one launch), all trials interleaved A B C A B C ..."""
    from sqdeploy.kernels import GraphedForward

    eager = {v: [] for v in models}
    graph = {v: [] for v in models}
    runs = {}
    for v, m in models.items():  # warm: kernel tuning, then capture
        m(ids, last_only=True)
        try:
            g = GraphedForward(m)
            g(ids)
            runs[v] = g
        except Exception as e:  # noqa: BLE001 - the eager numbers still stand
            print(f"   prefill graph capture failed for {v}: {e!r}"[:300], flush=True)
    torch.cuda.synchronize()
    for _ in range(3 if quick else 7):
        for v, m in models.items():
            eager[v].append(event_ms(lambda m=m: m(ids, last_only=True), reps=1, warmup=0))
            if v in runs:
                graph[v].append(event_ms(lambda g=runs[v]: g(ids), reps=1, warmup=0))
    del runs
    torch.cuda.empty_cache()
    return eager, graph


def _decode_all(model, cfg, quick: bool, r: dict) -> dict:
    out = {}
    for batch in (1, 8) if quick else (1, 8, 32, 64):
        ms, dec = decode_ms(model, batch, cfg.vocab_size)
        out[str(batch)] = {"ms_per_step": ms, "tokens_per_s": batch * 1000.0 / ms}
        if batch == 1:
            r["decode_profile_b1_ms"] = _safe(lambda d=dec: profile(lambda: d.graph.replay()))
        del dec
        gc.collect()
    return out


def _safe(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a profiler problem must not cost the timings
        return {"error": repr(e)[:300]}


def run_tp_smoke(model_dir: str, out) -> dict:
    from tp_smoke import run

    return run(model_dir, out)
