"""Markdown report and goal check of tools/gpu_bench.py (reads the JSON the sections wrote)."""

from __future__ import annotations

from sqdeploy.core.report import markdown_table

GOALS = {
    "w4a16_decode_b1_speedup": (">=", 2.5),
    "w4a16_decode_b8_speedup": (">=", 2.0),
    "w4a16_decode_b32_speedup": (">=", 1.3),
    "w4a16_decode_b64_speedup": (">=", 1.0),
    "w8a8_decode_b1_speedup": (">=", 1.5),
    "w8a8_decode_b32_speedup": (">=", 1.3),
    "w8a8_linears_m2048_speedup": (">=", 1.35),
    "w8a8_prefill_2048_speedup": (">=", 1.2),
    "w4a16_weight_memory_ratio": ("<=", 0.30),
    "w8a8_weight_memory_ratio": ("<=", 0.52),
}


def _layer_sum(data: dict, model: str, m: int, variant: str, field: str = "ms", plus_quant: bool = False):
    rows = [r for r in data.get("layers", []) if r["model"] == model and r["M"] == m and r["variant"] == variant]
    if len(rows) != 4 or any(r.get(field) is None for r in rows):
        return None
    total = sum(r[field] for r in rows)
    if plus_quant:
        if any(r.get("quant_ms") is None for r in rows):
            return None
        total += sum(r["quant_ms"] for r in rows)
    return total


def goal_values(data: dict) -> dict:
    out = {}
    e2e = (data.get("e2e") or {}).get("variants", {})
    fp = e2e.get("fp16")
    if fp and "w4a16" in e2e:
        for b in ("1", "8", "32", "64"):
            for v in ("w4a16", "w8a8"):
                d, f = (e2e.get(v) or {}).get("decode", {}).get(b), fp.get("decode", {}).get(b)
                if d and f:
                    out[f"{v}_decode_b{b}_speedup"] = d["tokens_per_s"] / f["tokens_per_s"]
    pipe = {(r["M"], r["variant"]): r["ms"] for r in (data.get("pipeline") or {}).get("rows", [])}
    for v, suffix in (("w8a8", ""), ("w8a8-token", "_per_token")):
        if pipe.get((2048, "fp16")) and pipe.get((2048, v)):
            out["w8a8_linears_m2048_speedup" + suffix] = pipe[(2048, "fp16")] / pipe[(2048, v)]
    f16, w8 = _layer_sum(data, "llama2-7b", 2048, "fp16"), _layer_sum(data, "llama2-7b", 2048, "w8a8", plus_quant=True)
    if f16 and w8:
        out["w8a8_linears_m2048_speedup_standalone_quant"] = f16 / w8
    if fp:
        for v in ("w8a8", "w8a8-token"):
            if v in e2e:
                key = "w8a8_prefill_2048_speedup" + ("" if v == "w8a8" else "_per_token")
                out[key] = fp["prefill_2048_ms"] / e2e[v]["prefill_2048_ms"]
                if fp.get("prefill_2048_graph_ms") and e2e[v].get("prefill_2048_graph_ms"):
                    out[key + "_graph"] = fp["prefill_2048_graph_ms"] / e2e[v]["prefill_2048_graph_ms"]
        for v in ("w4a16", "w8a8"):
            if v in e2e:
                out[f"{v}_weight_memory_ratio"] = e2e[v]["weight_bytes"]["total"] / fp["weight_bytes"]["total"]
    result = {}
    for k, v in out.items():
        base = k.replace("_per_token", "").replace("_standalone_quant", "").replace("_graph", "")
        op, target = GOALS.get(base, (None, None))
        ok = None if op is None else (v >= target if op == ">=" else v <= target)
        result[k] = {"value": round(v, 4), "goal": None if op is None else f"{op} {target}", "met": ok}
    return result


def _f(v, nd=3):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _roof(data: dict, r: dict, ms: float | None) -> str:
    c = data.get("ceilings") or {}
    if ms is None or not c:
        return "-"
    m, n, k = r["M"], r["N"], r["K"]
    act = m * k * (1 if r["variant"] == "w8a8" else 2) + m * n * 2
    rate = c["int8_triton_tops"] if r["variant"] == "w8a8" else c["fp16_tflops"]
    floor = max((r["weight_bytes"] + act) / (c["copy_gbps"] * 1e9), 2 * m * n * k / (rate * 1e12)) * 1e3
    return f"{100 * floor / ms:.0f}%"


def _layer_tables(data: dict) -> list[str]:
    out = []
    for model in sorted({r["model"] for r in data.get("layers", [])}):
        rows = []
        for m in sorted({r["M"] for r in data["layers"] if r["model"] == model}):
            f16 = _layer_sum(data, model, m, "fp16")
            w8 = _layer_sum(data, model, m, "w8a8")
            w8q = _layer_sum(data, model, m, "w8a8", plus_quant=True)
            w8t = _layer_sum(data, model, m, "w8a8", "torch_int_mm_ms")
            w4 = _layer_sum(data, model, m, "w4a16")
            w4t = _layer_sum(data, model, m, "w4a16", "torch_int4pack_ms")
            sp = lambda x: "-" if (x is None or f16 is None) else f"{f16 / x:.2f}x"  # noqa: E731
            rows.append([m, _f(f16), _f(w8), sp(w8), _f(w8q), sp(w8q), _f(w8t), sp(w8t), _f(w4), sp(w4), _f(w4t), sp(w4t)])
        out += [f"\n#### {model}: one decoder layer's linears (q|k|v, o, gate|up, down), ms\n",
                markdown_table(["M", "FP16", "W8A8 GEMM", "x", "W8A8 +quant", "x", "torch._int_mm W8A8", "x",
                                "W4A16", "x", "torch int4pack", "x"], rows)]
    return out


def _detail_table(data: dict) -> str:
    rows = []
    for r in data.get("layers", []):
        extra = ""
        if r["variant"] == "w4a16":
            extra = (f"INT4 kernels {_f(r.get('int4_fused_ms'), 4)} / dequant+cuBLAS {_f(r.get('int4_dequant_cublas_ms'), 4)}; "
                     f"tuner chose {r.get('int4_choice', '-')}")
        if r["variant"] == "w8a8":
            extra = f"per-token quant {_f(r.get('quant_ms'))}; tuner chose {r.get('int8_choice', '-')}"
        rows.append([r["model"], r["gemm"], f"{r['N']}x{r['K']}", r["M"], r["variant"], _f(r["ms"], 4),
                     _roof(data, r, r["ms"]), f"{r['weight_bytes'] / 2**20:.1f}", extra])
    return markdown_table(["model", "GEMM", "NxK", "M", "variant", "ms", "roofline", "weight MiB", "notes"], rows)


def _e2e_tables(data: dict) -> list[str]:
    e2e = data.get("e2e")
    if not e2e:
        return []
    c = data.get("ceilings") or {}
    rows, prof = [], []
    for v, r in e2e["variants"].items():
        wb = r["weight_bytes"]
        dec = r["decode"]
        b1_floor = (wb["total"] / (c["copy_gbps"] * 1e9)) * 1e3 if c else None
        rows.append([v, f"{wb['total'] / 2**30:.2f}", f"{wb['linears'] / 2**30:.2f}", _f(r["prefill_2048_ms"], 1),
                     _f(r.get("prefill_2048_graph_ms"), 1)]
                    + [_f(dec.get(b, {}).get("tokens_per_s"), 1) for b in ("1", "8", "32", "64")]
                    + [_f(dec["1"]["ms_per_step"], 2), _f(b1_floor, 2)])
        for cat, ms in (r.get("decode_profile_b1_ms") or {}).items():
            prof.append([v, "decode b1 step", cat, _f(ms, 3)])
        for cat, ms in (r.get("prefill_profile_ms") or {}).items():
            prof.append([v, "prefill 2048", cat, _f(ms, 2)])
    return [
        "\n### End to end, Llama-2-7B shapes (random weights)\n",
        f"Decode: prompt {e2e['prompt_tokens_for_decode']} tokens, each step one CUDA-graph replay, "
        f"{e2e['decode_steps_timed']} steps timed (median of 3). Prefill: 2048 tokens, batch 1, logits of the last "
        "position, wall clock, median of interleaved trials: eager (`model(ids)`, one Python launch per kernel) and "
        "replayed from a CUDA graph (`GraphedForward`).\n",
        markdown_table(["variant", "weights GiB", "linears GiB", "prefill 2048 ms eager", "prefill 2048 ms graph",
                        "tok/s b1", "tok/s b8", "tok/s b32", "tok/s b64",
                        "ms/step b1", "b1 floor ms (weights/copy BW)"], rows),
        "\nKernel time by category (CUDA profiler, one call):\n",
        markdown_table(["variant", "what", "category", "ms"], prof) if prof else "(no profile)",
    ]


def render(data: dict) -> str:
    env, c = data.get("env", {}), data.get("ceilings", {})
    parts = ["# GPU benchmark: real INT8/INT4 kernels\n",
             f"GPU: **{env.get('gpu')}** (compute capability {env.get('capability')}, {env.get('sms')} SMs, "
             f"L2 {_f(env.get('l2_mb'), 0)} MB), PyTorch {env.get('torch')}, Triton {env.get('triton')}, CUDA {env.get('cuda')}.\n",
             "Command: `PYTHONPATH=. python tools/gpu_bench.py --out OUT --model .carry/tiny-code-llama` "
             "(the shared tiny Llama copied into the git-ignored `.carry/`).\n",
             "\n## Goals\n", markdown_table(["goal", "value", "target", "met"],
                                            [[k, v["value"], v["goal"], v["met"]] for k, v in (data.get("goals") or {}).items()]),
             "\n## Ceilings measured in this run\n",
             markdown_table(["ceiling", "value"], [[k, _f(v, 1) if isinstance(v, float) else v] for k, v in c.items()])]
    kc = data.get("kernel_checks")
    if kc:
        bad = [r for r in kc["rows"] if not r["ok"]]
        parts += ["\n## Kernel self-checks\n", f"{len(kc['rows'])} checks, {len(bad)} failed; split-K reduction "
                  f"{'trusted' if kc['splitk_ok'] else 'DISABLED (failed its check)'}.\n",
                  markdown_table(["check", "case", "value", "limit", "ok"],
                                 [[r["check"], r["case"][:60], f"{r['value']:.3g}", r["limit"], r["ok"]] for r in kc["rows"]])]
    tm = data.get("tiny_model")
    if tm:
        parts += ["\n## Shared tiny Llama, quantized on the GPU: kernels vs the fake-quant reference\n",
                  "Relative error of the logits against the float32 fake-quant reference (4 windows x 256 tokens); "
                  "the float16 fake-quant reference's own error is the yardstick of float16 arithmetic. "
                  "Greedy: leading tokens (of 32) identical to the reference's greedy decode, per prompt.\n",
                  markdown_table(["recipe", "err kernels", "err fp16 ref", "ppl fp32 ref", "ppl kernels", "top-1 agree",
                                  "greedy = ref16", "greedy = ref32", "ok"],
                                 [[r["recipe"], f"{r['rel_err_kernels']:.2e}", f"{r['rel_err_fp16_ref']:.2e}",
                                   _f(r["ppl_ref32"]), _f(r["ppl_kernels"]), _f(r["top1_agree_kernels"], 4),
                                   r["greedy_match_ref16"], r["greedy_match_ref32"], r["ok"]] for r in tm["rows"]])]
    if data.get("layers"):
        parts += ["\n## Per-layer GEMM time\n",
                  "Each GEMM replayed from a CUDA graph over enough weight copies to exceed 3x the L2. "
                  "'W8A8 GEMM' takes INT8 input; '+quant' adds the one-pass per-token quantization of each GEMM's input "
                  "(4 kernels a layer), the strict accounting of the goal. 'x' = speed-up over FP16.\n"]
        parts += _layer_tables(data)
        parts += ["\n### Every GEMM, next to its roofline (max of bytes/copy-BW and FLOPs/matmul-rate)\n", _detail_table(data)]
    pipe = data.get("pipeline")
    if pipe:
        base = {r["M"]: r["ms"] for r in pipe["rows"] if r["variant"] == "fp16"}
        parts += ["\n### A 7B layer's linears with the kernels that feed them (the goal's accounting)\n",
                  "norm(+quant) -> q|k|v; (one-pass quant) -> o; norm(+quant) -> gate|up; act*mul(+quant) -> down. "
                  "FP16 runs the same norms and act*mul without quantization; attention excluded. One CUDA graph, ms.\n",
                  markdown_table(["M", "variant", "ms", "speed-up vs FP16"],
                                 [[r["M"], r["variant"], _f(r["ms"], 4),
                                   "-" if not (r["ms"] and base.get(r["M"])) else f"{base[r['M']] / r['ms']:.2f}x"]
                                  for r in pipe["rows"]])]
    parts += _e2e_tables(data)
    if data.get("tp"):
        parts += ["\n## Tensor parallelism (single-GPU smoke run)\n", "```\n" + str(data["tp"])[:3000] + "\n```\n"]
    parts += ["\n## Sections\n", markdown_table(["section", "status"], [[k, str(v)[:200]] for k, v in data["sections"].items()])]
    return "\n".join(parts) + "\n"
