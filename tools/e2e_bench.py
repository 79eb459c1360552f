"""End-to-end part of tools/gpu_bench.py: a 7B-shaped model per variant, and the tensor-parallel smoke run."""

from __future__ import annotations

import gc
import statistics

import torch

from sqdeploy.kernels import GraphDecoder
from sqdeploy.kernels.measure import event_ms
from sqdeploy.kernels.random_weights import VARIANTS, random_model, weight_bytes

PROMPT, STEPS, TRIALS = 128, 32, 3
CATEGORIES = (
    ("int8 GEMM (Triton)", ("_int8_gemm",)),
    ("int4 GEMM (Triton)", ("_int4_",)),
    ("attention", ("flash", "fmha", "attention", "efficient", "sdpa")),
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
def profile(fn) -> dict[str, float]:
    """Kernel time (ms) per category for one call of ``fn``."""
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
        out[category(e.name)] = out.get(category(e.name), 0.0) + us / 1000.0
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
    res = {"model": "llama2-7b shapes, random weights", "prompt_tokens_for_decode": PROMPT,
           "decode_steps_timed": STEPS, "prefill_tokens": 2048, "variants": {}}
    for variant in ("fp16", "w8a8", "w8a8-token", "w4a16"):
        try:
            res["variants"][variant] = _one_variant(cfg, variant, quick)
        except Exception:  # noqa: BLE001 - one broken variant must not cost the others
            import traceback

            res.setdefault("errors", {})[variant] = traceback.format_exc()[-2000:]
            print(res["errors"][variant], flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    return res


def _one_variant(cfg, variant: str, quick: bool) -> dict:
    with torch.no_grad():
        base = torch.cuda.memory_allocated()
        model = random_model(cfg, VARIANTS[variant], "cuda")
        torch.cuda.synchronize()
        r = {"weight_bytes": weight_bytes(model), "allocated_bytes": torch.cuda.memory_allocated() - base}
        ids = torch.randint(0, cfg.vocab_size, (1, 2048), device="cuda")
        r["prefill_2048_ms"] = event_ms(lambda: model(ids, last_only=True), reps=3 if quick else 5, warmup=2)
        r["prefill_profile_ms"] = _safe(lambda: profile(lambda: model(ids, last_only=True)))
        r["decode"] = {}
        for batch in (1, 8) if quick else (1, 8, 32):
            ms, dec = decode_ms(model, batch, cfg.vocab_size)
            r["decode"][str(batch)] = {"ms_per_step": ms, "tokens_per_s": batch * 1000.0 / ms}
            if batch == 1:
                r["decode_profile_b1_ms"] = _safe(lambda: profile(lambda: dec.graph.replay()))
                r["decode_profile_b1_eager_ms"] = _safe(lambda: profile(_eager_step(dec)))
            del dec
            gc.collect()
        print(f"   e2e {variant}: {r['prefill_2048_ms']:.1f} ms prefill, decode {r['decode']}", flush=True)
        del model
        return r


def _eager_step(dec: GraphDecoder):
    def run():
        dec._step()
        dec.cache.pos.sub_(1)
        dec.cache.length -= 1
    return run


def _safe(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a profiler problem must not cost the timings
        return {"error": repr(e)[:300]}


def run_tp_smoke(model_dir: str, out) -> dict:
    from tp_smoke import run

    return run(model_dir, out)
