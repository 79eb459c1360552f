"""Configuration sweep on the GPU: every kernel candidate timed on Llama-2-7B shapes, one table each.

    PYTHONPATH=. python tools/gpu_tune.py --out OUT [--only gemv,int8,pipeline,e2e]

What the tuner chooses at run time is the fastest candidate by its own short timing; this
script shows the whole field (so candidate lists can be pruned and new kernels judged):

* ``gemv``: every one-row INT4 configuration (narrow split-K and wide-tile GEMVs) and
  ``torch._weight_int4pack_mm`` on the 7B layer's shapes, cold weights (copies cycling past
  the L2), CUDA-graph replays; bandwidth next to the measured copy bandwidth;
* ``int8``: every INT8 GEMM configuration (pointer-based and TMA-fed) at M = 2048;
* ``pipeline``: a 7B layer's linears with their norm/activation/quantization kernels, W8A8 vs
  FP16, with the kernel-time profile of one replay;
* ``e2e``: the 7B-shaped model, FP16 / W8A8 / W4A16: decode at batch 1 (profiled) and prefill
  of 2048 tokens, eager and from a CUDA graph.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sqdeploy.core.report import markdown_table  # noqa: E402
from sqdeploy.kernels.reference import InputQuant  # noqa: E402
from sqdeploy.testing.measure import copies_for, copy_bandwidth, graph_ms, l2_bytes  # noqa: E402
from sqdeploy.testing.random_weights import LLAMA2_7B, VARIANTS, config_of, layer_shapes, random_linear  # noqa: E402


def _forced(tuner, cfg, fns):
    tuner.forced = cfg
    try:
        return graph_ms(fns, reps=10, trials=3)
    except Exception as e:  # noqa: BLE001 - reported in the table
        print(f"   {cfg}: {type(e).__name__}: {e}"[:300], flush=True)
        return None
    finally:
        tuner.forced = None


EXTRA_GEMV = [(64, 128, 256, 2), (128, 128, 256, 4), (64, 128, 128, 2), (256, 128, 256, 4), (512, 128, 512, 4),
              (64, 128, 2048, 4), (128, 128, 1024, 4, 1, 3), (64, 64, 256, 2), (128, 64, 512, 4), (32, 256, 256, 2, 0)]
EXTRA_TMA: list = []


def sweep_gemv(res: dict) -> None:
    from gpu_bench_sections import _int4pack_fns

    from sqdeploy.kernels import ops
    from sqdeploy.kernels import triton_gemm as tg
    from sqdeploy.testing import kernel_selftest as selftest

    cfg7 = config_of(LLAMA2_7B)
    rows = []
    for gemm, (n, k) in layer_shapes(cfg7).items():
        probe = random_linear(n, k, VARIANTS["w4a16"], "cuda")
        mods = [probe] + [random_linear(n, k, VARIANTS["w4a16"], "cuda", seed=j)
                          for j in range(1, copies_for(probe.weight_bytes(), l2_bytes()))]
        gated = gemm == "down"
        x = torch.randn(1, 2 * k if gated else k, device="cuda", dtype=torch.float16)
        ops.FUSE_ACT_INTO_GEMV = True  # each candidate with the activation inside (down), then the default path
        for cfg in tg.gemv_candidates(k, 128):
            fns = [(lambda m=m: ops.int4_linear_act(x, m.int4(), None, "silu")) if gated else (lambda m=m: m(x)) for m in mods]
            ms = _forced(tg._INT4_GEMV, cfg, fns)
            rows.append({"gemm": gemm + (" (+silu*up)" if gated else ""), "cfg": selftest._brief(cfg), "ms": ms,
                         "GBps": None if not ms else probe.weight_bytes() / ms / 1e6})
        ops.FUSE_ACT_INTO_GEMV = False
        if gated:
            ms = graph_ms([lambda m=m: ops.int4_linear_act(x, m.int4(), None, "silu") for m in mods], reps=10)
            rows.append({"gemm": "down (+silu*up)", "cfg": "separate act*mul kernel + tuned GEMV", "ms": ms,
                         "GBps": probe.weight_bytes() / ms / 1e6})
        from sqdeploy.kernels import gemlite_int4

        for cfg in gemlite_int4.candidates(1, 128, True):
            ms = _forced(tg._INT4_GEMV, cfg, [lambda m=m: m(x[:, :k]) for m in mods])
            rows.append({"gemm": gemm, "cfg": selftest._brief(cfg), "ms": ms,
                         "GBps": None if not ms else probe.weight_bytes() / ms / 1e6})
        xp = torch.randn(1, k, device="cuda", dtype=torch.float16)
        ms = graph_ms(_int4pack_fns(n, k, len(mods), xp), reps=10)
        rows.append({"gemm": gemm, "cfg": "torch._weight_int4pack_mm", "ms": ms, "GBps": probe.weight_bytes() / ms / 1e6})
        print(f"   gemv {gemm}: best {min((r['ms'] for r in rows if r['ms'] and r['gemm'].startswith(gemm)))*1e3:.1f} us",
              flush=True)
        del mods, probe
        torch.cuda.empty_cache()
    res["gemv"] = rows


def sweep_w4_small_m(res: dict, ms=(1, 4, 8, 16, 32, 64, 128)) -> None:
    """W4A16 at small M, summed over a 7B layer's GEMMs: the tuner's choice (this package's kernels and
    gemlite's), each gemlite type forced, and FP16 cuBLAS, interleaved per M."""
    from sqdeploy.kernels import gemlite_int4
    from sqdeploy.kernels import triton_gemm as tg
    from sqdeploy.testing.measure import interleaved_ms

    cfg7 = config_of(LLAMA2_7B)
    shapes = layer_shapes(cfg7)
    w4 = {g: [random_linear(n, k, VARIANTS["w4a16"], "cuda", seed=j) for j in range(2)] for g, (n, k) in shapes.items()}
    f16 = {g: [random_linear(n, k, VARIANTS["fp16"], "cuda", seed=j) for j in range(2)] for g, (n, k) in shapes.items()}
    rows = []
    for m in ms:
        xs = {g: torch.randn(m, k, device="cuda", dtype=torch.float16) for g, (n, k) in shapes.items()}
        variants = {"fp16": [lambda mod=mod, g=g: mod(xs[g]) for g in shapes for mod in f16[g]],
                    "w4 tuned": [lambda mod=mod, g=g: mod(xs[g]) for g in shapes for mod in w4[g]]}
        t = interleaved_ms(variants, reps=10, trials=5)
        row = {"M": m, "fp16_ms": t["fp16"] * len(shapes), "w4_tuned_ms": t["w4 tuned"] * len(shapes)}
        tuner = tg._INT4_GEMV if m == 1 else tg._INT4
        for cfg in gemlite_int4.candidates(tg._m_bucket(m), 128, True):
            tuner.forced = cfg
            try:
                row[f"gemlite {cfg['TYPE']}_ms"] = graph_ms([lambda mod=mod, g=g: mod(xs[g]) for g in shapes for mod in w4[g]],
                                                            reps=10) * len(shapes)
            except Exception as e:  # noqa: BLE001 - reported
                row[f"gemlite {cfg['TYPE']}_ms"] = f"{type(e).__name__}: {e}"[:200]
            finally:
                tuner.forced = None
        rows.append(row)
        print(f"   w4 M={m}: {row}", flush=True)
    res["w4_small_m"] = rows
    res["w4_small_m_choice"] = __import__("sqdeploy.kernels.tuning", fromlist=["chosen"]).chosen()


def sweep_int8(res: dict, m: int = 2048) -> None:
    from sqdeploy.kernels import ops
    from sqdeploy.kernels import triton_gemm as tg
    from sqdeploy.testing import kernel_selftest as selftest

    rows = []
    for gemm, (n, k) in layer_shapes(config_of(LLAMA2_7B)).items():
        probe = random_linear(n, k, VARIANTS["w8a8"], "cuda")
        mods = [probe] + [random_linear(n, k, VARIANTS["w8a8"], "cuda", seed=j)
                          for j in range(1, copies_for(probe.weight_bytes(), l2_bytes()))]
        qa = ops.quantize(torch.randn(m, k, device="cuda", dtype=torch.float16), InputQuant("token"))
        for cfg in tg.int8_candidates(m, k, qa.q.device):
            ms = _forced(tg._INT8, cfg, [lambda mod=mod: mod.compute(qa) for mod in mods])
            rows.append({"gemm": gemm, "cfg": selftest._brief(cfg), "ms": ms,
                         "TOPS": None if not ms else 2 * m * n * k / ms / 1e9})
        print(f"   int8 {gemm}: best {min(r['ms'] for r in rows if r['ms'] and r['gemm'] == gemm):.4f} ms", flush=True)
        del mods, probe
        torch.cuda.empty_cache()
    res["int8"] = rows


def pipeline(res: dict) -> None:
    from e2e_bench import profile
    from gpu_bench_sections import _pipeline_fns

    from sqdeploy.testing.measure import interleaved_ms

    cfg7 = config_of(LLAMA2_7B)
    built = {v: _pipeline_fns(cfg7, v, 2048) for v in ("fp16", "w8a8", "w8a8-token")}
    res["pipeline_ms"] = interleaved_ms({v: f for v, (f, _) in built.items()}, reps=10, trials=9)
    res["pipeline_profile"] = {v: profile(f[0], by_kernel=True) for v, (f, _) in built.items()}
    print(f"   pipeline: {res['pipeline_ms']}", flush=True)


E2E_VARIANTS = ("fp16", "w4a16")


def e2e(res: dict) -> None:
    import statistics

    from e2e_bench import decode_ms, profile

    from sqdeploy.kernels import GraphedForward
    from sqdeploy.testing.measure import event_ms
    from sqdeploy.testing.random_weights import random_model

    cfg7 = config_of(LLAMA2_7B)
    ids = torch.randint(0, cfg7.vocab_size, (1, 2048), device="cuda")
    out = {}
    for v in E2E_VARIANTS:
        model = random_model(cfg7, VARIANTS[v], "cuda")
        with torch.no_grad():
            model(ids, last_only=True)
            eager = statistics.median(event_ms(lambda: model(ids, last_only=True), reps=1, warmup=0) for _ in range(5))
            graphed = GraphedForward(model)
            graphed(ids)
            graph = event_ms(lambda: graphed(ids), reps=7, warmup=1)
        ms, dec = decode_ms(model, 1, cfg7.vocab_size)
        out[v] = {"prefill_eager_ms": eager, "prefill_graph_ms": graph, "decode_b1_ms": ms,
                  "decode_profile": profile(lambda d=dec: d.graph.replay(), by_kernel=True),
                  "prefill_profile": profile(lambda: graphed(ids), by_kernel=True)}
        print(f"   e2e {v}: prefill eager {eager:.1f} graph {graph:.1f} ms, decode b1 {ms:.3f} ms", flush=True)
        del model, dec, graphed
        torch.cuda.empty_cache()
    out["tuning"] = {k: v for k, v in __import__("sqdeploy.kernels.tuning", fromlist=["chosen"]).chosen().items()}
    res["e2e"] = out


def checks(res: dict) -> None:
    from sqdeploy.kernels import triton_gemm as tg
    from sqdeploy.testing import kernel_selftest as selftest

    rows: list = []
    for fn in (selftest.check_candidates, selftest.check_gemlite, selftest.check_fused, selftest.check_gated_gemv, selftest.check_decode_attention):
        selftest._guarded(rows, fn.__name__, fn)
    res["checks"] = rows


def report(res: dict) -> str:
    parts = [f"copy bandwidth {res.get('copy_gbps', 0):.0f} GB/s"]
    if "checks" in res:
        bad = [r for r in res["checks"] if not r["ok"]]
        parts.append(f"self-checks: {len(res['checks'])}, failed: {[(r['check'], r['case'], r['value']) for r in bad]}")
    for key, unit in (("gemv", "GBps"), ("int8", "TOPS")):
        if key in res:
            parts.append(markdown_table(["gemm", "config", "ms", unit],
                                        [[r["gemm"], r["cfg"], None if r["ms"] is None else round(r["ms"], 4),
                                          None if r[unit] is None else round(r[unit])] for r in res[key]]))
    if "pipeline_ms" in res:
        parts.append(json.dumps(res["pipeline_ms"]))
        for v, prof in res["pipeline_profile"].items():
            parts.append(f"{v}: " + ", ".join(f"{k[:40]}={ms:.3f}" for k, ms in list(prof.items())[:10]))
    for v, r in (res.get("e2e") or {}).items():
        if v == "tuning":
            continue
        parts.append(f"{v}: prefill eager {r['prefill_eager_ms']:.2f} graph {r['prefill_graph_ms']:.2f} decode {r['decode_b1_ms']:.3f}")
        parts.append("  decode: " + ", ".join(f"{k[:36]}={ms:.3f}" for k, ms in list(r["decode_profile"].items())[:12]))
        parts.append("  prefill: " + ", ".join(f"{k[:36]}={ms:.2f}" for k, ms in list(r["prefill_profile"].items())[:10]))
    return "\n".join(parts)


def main() -> int:
    global E2E_VARIANTS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="checks,gemv,int8,pipeline,e2e")
    ap.add_argument("--no-extra", action="store_true", help="only the shipped candidates (no extra sweep entries)")
    ap.add_argument("--e2e-variants", default=",".join(E2E_VARIANTS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_tune: no CUDA GPU visible; this sweep runs on a GPU machine", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    from sqdeploy.kernels import triton_gemv, triton_int8_tma

    if not args.no_extra:
        triton_gemv.CANDIDATES += [triton_gemv.gemv_cfg(*c) for c in EXTRA_GEMV]  # checked, then timed
        triton_int8_tma.LARGE_M += [triton_int8_tma.tma_cfg(*c) for c in EXTRA_TMA]
    E2E_VARIANTS = tuple(args.e2e_variants.split(","))
    res: dict = {"copy_gbps": copy_bandwidth() / 1e9}
    steps = {"checks": checks, "gemv": sweep_gemv, "w4m": sweep_w4_small_m, "int8": sweep_int8,
             "pipeline": pipeline, "e2e": e2e}
    for name in args.only.split(","):
        t0 = time.time()
        try:
            steps[name](res)
        except Exception:  # noqa: BLE001 - the other sweeps still run
            import traceback

            res[f"{name}_error"] = traceback.format_exc()[-3000:]
            print(res[f"{name}_error"], flush=True)
        print(f"== {name}: {time.time() - t0:.0f}s", flush=True)
        (out / "tune.json").write_text(json.dumps(res, indent=1, default=str))
    text = report(res)
    (out / "tune.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
