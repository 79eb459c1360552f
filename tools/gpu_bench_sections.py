"""The measurements of tools/gpu_bench.py, one function per section (each fills ``bench.data[name]``)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sqdeploy.core.report import write_json_atomic
from sqdeploy.kernels import ops, triton_gemm, tuning
from sqdeploy.kernels.reference import InputQuant
from sqdeploy.testing import kernel_selftest as selftest
from sqdeploy.testing.measure import copies_for, copy_bandwidth, event_ms, graph_ms, l2_bytes, matmul_rate
from sqdeploy.testing.random_weights import CODELLAMA_34B, LLAMA2_7B, VARIANTS, config_of, layer_shapes, random_linear

MS_ALL = (1, 16, 64, 256, 2048)


class Bench:
    def __init__(self, out: Path, model_dir: str, deadline: float, quick: bool):
        self.out, self.model_dir, self.deadline, self.quick = out, model_dir, deadline, quick
        out.mkdir(parents=True, exist_ok=True)
        self.data: dict = {"sections": {}}
        self.l2 = l2_bytes()

    def remaining(self) -> float:
        return self.deadline - time.time()

    def done(self, name: str, seconds: float) -> None:
        self.data["sections"][name] = {"status": "ok", "seconds": round(seconds, 1)}

    def fail(self, name: str, tb: str) -> None:
        self.data["sections"][name] = {"status": "failed", "error": tb[-3000:]}

    def skip(self, name: str, why: str) -> None:
        self.data["sections"][name] = {"status": why}

    def save(self) -> None:
        self.data["tuning"] = tuning.chosen()
        write_json_atomic(self.out / "gpu-bench.json", self.data)

    def summary(self) -> dict:
        return {"sections": self.data["sections"], "goals": self.data.get("goals")}

    def write_report(self) -> None:
        from gpu_bench_report import render

        self.data["goals"] = goals(self.data)
        self.save()
        (self.out / "gpu-bench.md").write_text(render(self.data))


# ------------------------------------------------------------------ 1. environment and ceilings

def environment(b: Bench) -> None:
    import triton

    p = torch.cuda.get_device_properties(0)
    b.data["env"] = {
        "gpu": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
        "sms": p.multi_processor_count, "l2_mb": b.l2 / 2**20, "memory_gb": p.total_memory / 2**30,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "nccl_nvls_enable": __import__("os").environ.get("NCCL_NVLS_ENABLE"),
    }


def ceilings(b: Bench) -> None:
    c = {"copy_gbps": copy_bandwidth() / 1e9, "fp16_tflops": matmul_rate(8192) / 1e12}
    n = 8192
    qa = ops.quantize(torch.randn(n, n, device="cuda", dtype=torch.float16), InputQuant("token"))
    w = torch.randint(-128, 128, (n, n), dtype=torch.int8, device="cuda")
    sw = torch.rand(n, device="cuda")
    c["int8_triton_tops"] = 2 * n**3 / (event_ms(lambda: triton_gemm.int8_gemm(qa.q, qa.scale, w, sw, None, torch.float16), 10, 3) * 1e-3) / 1e12
    try:
        c["int8_torch_int_mm_tops"] = 2 * n**3 / (event_ms(lambda: torch._int_mm(qa.q, w.t()), 10, 3) * 1e-3) / 1e12
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        c["int8_torch_int_mm_error"] = repr(e)[:200]
    b.data["ceilings"] = c


# ------------------------------------------------------------------ 2. kernel self-checks

def kernel_checks(b: Bench) -> None:
    rows, splitk_ok = selftest.run_all()
    b.data["kernel_checks"] = {"rows": rows, "splitk_ok": splitk_ok, "all_ok": all(r["ok"] for r in rows)}


# ------------------------------------------------------------------ 3. the real tiny model

def _eval_windows(tok_dir: str, n: int, length: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    text = "\n".join(p.read_text() for p in sorted(Path("sqdeploy").rglob("*.py"))[::3])
    ids = tok(text)["input_ids"]
    step = max(length, (len(ids) - length) // n)
    return torch.tensor([ids[i * step : i * step + length] for i in range(n)])


def _ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return math.exp(float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())))


def tiny_model(b: Bench) -> None:
    from sqdeploy.kernels import GraphDecoder, load_for_device, matching_lead
    from sqdeploy.model.generate import greedy_generate
    from sqdeploy.model.loading import load_model
    from sqdeploy.testing.inmemory import quantize_in_memory

    calib = Path("/tmp/sqdeploy-calib.jsonl")
    src_text = Path("sqdeploy/quantize/smoothing.py").read_text()
    calib.write_text("\n".join(json.dumps({"text": src_text[i : i + 2000]}) for i in range(0, len(src_text), 2000)) + "\n")
    ids = _eval_windows(b.model_dir, 4, 256).cuda()
    rows = []
    for label, recipe in TINY_RECIPES.items():
        t0 = time.time()
        src = quantize_in_memory(b.model_dir, recipe, str(calib), samples=8, seq_len=128, device="cuda")
        qs = time.time() - t0
        with torch.no_grad():
            ref32 = load_model(src, torch.float32, "cuda")
            l32 = ref32(ids)
            ref16 = load_model(src, torch.float16, "cuda")
            l16 = ref16(ids)
            kern = load_for_device(src, "cuda")
            lk = kern(ids)
        e16, ek = selftest._rel(l16, l32), selftest._rel(lk, l32)
        row = {
            "recipe": label, "quantize_s": round(qs, 1), "rel_err_fp16_ref": e16, "rel_err_kernels": ek,
            "ppl_ref32": _ppl(l32, ids), "ppl_ref16": _ppl(l16, ids), "ppl_kernels": _ppl(lk, ids),
            "top1_agree_kernels": float((lk.argmax(-1) == l32.argmax(-1)).float().mean()),
            "top1_agree_fp16_ref": float((l16.argmax(-1) == l32.argmax(-1)).float().mean()),
            "ok": bool(ek <= max(2 * e16, 2e-3)),
        }
        prompts, n_new = ids[:2, :32], 32
        dec = GraphDecoder(kern, 2, 32 + n_new + 2)
        dec.prefill(prompts)
        for _ in range(n_new - 1):
            dec.step()
        got = dec.generated(n_new).tolist()
        for name, model in (("ref16", ref16), ("ref32", ref32)):
            want = [greedy_generate(model, p.tolist(), n_new) for p in prompts]
            row[f"greedy_match_{name}"] = [matching_lead(a, w) for a, w in zip(got, want)]
        rows.append(row)
        del ref32, ref16, kern, dec, src
        torch.cuda.empty_cache()
    b.data["tiny_model"] = {"model": b.model_dir, "windows": list(ids.shape), "greedy_new_tokens": 32, "rows": rows}


def _rtn(name: str, weight: dict, act: str = "none"):
    from sqdeploy.quantize.recipes import parse_recipe

    return parse_recipe({"name": name, "scheme": {"weight": weight, "act": {"kind": act}}, "algorithm": "rtn"})


# Round-to-nearest versions of the W8A8 recipes: the smoothing algorithms' search does not run
# on CUDA in this version of the exporter (a device mismatch), and the kernels do not care how
# the integers were chosen.
TINY_RECIPES = {
    "fp16": "fp16",
    "w8a8 static (rtn)": _rtn("w8a8-static-rtn", {"bits": 8, "granularity": "channel"}, "static_tensor"),
    "w8a8 per-token (rtn)": _rtn("w8a8-token-rtn", {"bits": 8, "granularity": "channel"}, "dynamic_token"),
    "w4a16-rtn (g128 asym)": "w4a16-rtn",
    "w4a16 g64 sym (rtn)": _rtn("w4a16-g64-sym", {"bits": 4, "granularity": "group", "group_size": 64, "symmetric": True}),
}


# ------------------------------------------------------------------ 4. per-layer GEMMs

def _variant_fns(name: str, mods: list, x: torch.Tensor):
    """Closures timing one GEMM of each weight copy (W8A8: the GEMM alone, input already INT8)."""
    if name.startswith("w8a8"):
        qa = ops.quantize(x, InputQuant("token"))
        return [lambda mod=mod: mod.compute(qa) for mod in mods]
    return [lambda mod=mod: mod(x) for mod in mods]


def _torch_int_mm_fns(mods: list, x: torch.Tensor):
    """W8A8 through PyTorch's built-in: per-token quantization, torch._int_mm, dequantization, all as torch ops."""
    def run(mod):
        xf = x.float()
        s = (xf.abs().amax(-1, keepdim=True) / 127.0).clamp_min(1e-8)
        q = torch.round(xf / s).clamp(-128, 127).to(torch.int8)
        acc = torch._int_mm(q, mod.qweight.t())
        return (acc.float() * s * mod.wscale).half()

    return [lambda mod=mod: run(mod) for mod in mods]


def _int4pack_fns(n: int, k: int, copies: int, x: torch.Tensor):
    fns = []
    xb = x.bfloat16()
    for _ in range(copies):
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
        packed = torch._convert_weight_to_int4pack(w, 8)
        sz = (torch.rand(k // 128, n, 2, device="cuda") * 0.01).bfloat16()
        fns.append(lambda p=packed, s=sz: torch._weight_int4pack_mm(xb, p, 128, s))
    return fns


def _timed(fns) -> float | None:
    try:
        return graph_ms(fns, reps=10 if len(fns) > 4 else 20)
    except Exception as e:  # noqa: BLE001 - a built-in that rejects a shape is reported as missing
        print(f"   timing failed: {e!r}"[:300], flush=True)
        return None


def _layer_bench(b: Bench, label: str, hf: dict, ms: tuple[int, ...]) -> None:
    cfg = config_of(hf)
    out = []
    quant_ms = {}
    for gemm, (n, k) in layer_shapes(cfg).items():
        for m in ms:
            if (m, k) not in quant_ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                quant_ms[(m, k)] = _timed([lambda: ops.quantize(x, InputQuant("token"))])
        for variant in ("fp16", "w8a8", "w4a16"):
            probe = random_linear(n, k, VARIANTS[variant], "cuda", seed=0)
            copies = copies_for(probe.weight_bytes(), b.l2)
            mods = [probe] + [random_linear(n, k, VARIANTS[variant], "cuda", seed=j) for j in range(1, copies)]
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                rec = {"model": label, "gemm": gemm, "N": n, "K": k, "M": m, "variant": variant,
                       "weight_bytes": probe.weight_bytes(), "ms": _timed(_variant_fns(variant, mods, x))}
                if variant == "w8a8":
                    rec["quant_ms"] = quant_ms[(m, k)]
                    rec["torch_int_mm_ms"] = _timed(_torch_int_mm_fns(mods, x)) if m > 16 else None
                    rec["int8_choice"] = triton_gemm.int8_choice(m, n, k)
                if variant == "w4a16":
                    rec["int4_choice"] = triton_gemm.int4_choice(m, n, k, probe.group_size)
                    rec.update(_int4_alternatives(mods, x))
                    rec["torch_int4pack_ms"] = _timed(_int4pack_fns(n, k, copies, x))
                out.append(rec)
                print(f"   {label} {gemm} M={m} {variant}: {rec['ms']}", flush=True)
            del mods, probe
            torch.cuda.empty_cache()
    b.data.setdefault("layers", []).extend(out)


def _int4_alternatives(mods, x) -> dict:
    """The INT4 kernels alone (no dequantize-then-cuBLAS candidate) and dequantize-then-cuBLAS alone."""
    keep = ops.INT4_FUSED_MAX_M
    res = {}
    try:
        ops.INT4_TUNE_DEQUANT = False
        res["int4_fused_ms"] = _timed([lambda mod=mod: mod(x) for mod in mods])
        ops.INT4_TUNE_DEQUANT = True
        ops.INT4_FUSED_MAX_M = 0
        res["int4_dequant_cublas_ms"] = _timed([lambda mod=mod: mod(x) for mod in mods])
    finally:
        ops.INT4_FUSED_MAX_M, ops.INT4_TUNE_DEQUANT = keep, True
    return res


def _pipeline_fns(cfg, variant: str, m: int):
    """One layer's linears with the kernels that feed them, as the model runs them:
    norm(+quant) -> q|k|v, (quant) -> o, norm(+quant) -> gate|up, act*mul(+quant) -> down."""
    from sqdeploy.model.layers import Norm

    shapes = layer_shapes(cfg)
    mods = {g: random_linear(n, k, VARIANTS[variant], "cuda", seed=i) for i, (g, (n, k)) in enumerate(shapes.items())}
    norm = Norm(cfg).cuda().half()
    x = torch.randn(m, cfg.hidden_size, device="cuda", dtype=torch.float16)
    attn_out = torch.randn(m, cfg.q_size, device="cuda", dtype=torch.float16)
    iq = mods["qkv"].input_quant

    def run():
        _, a_in = ops.add_norm(x, None, norm, iq)
        mods["qkv"](a_in)
        mods["o"](attn_out)  # quantizes its own input (one pass) when INT8
        _, m_in = ops.add_norm(x, attn_out, norm, iq)
        gu = mods["gate_up"](m_in)
        mods["down"](ops.act_mul(gu, cfg.act, True, mods["down"].input_quant))

    return [run], mods


def pipeline_7b(b: Bench) -> None:
    """The goal's 'W8A8 linears with activation quantization included', as the model runs them."""
    from sqdeploy.testing.measure import interleaved_ms

    cfg = config_of(LLAMA2_7B)
    rows = []
    for m in (16, 256, 2048):
        built = {v: _pipeline_fns(cfg, v, m) for v in ("fp16", "w8a8", "w8a8-token")}
        ms = interleaved_ms({v: fns for v, (fns, _) in built.items()}, reps=10 if m == 2048 else 50, trials=9)
        rows += [{"M": m, "variant": v, "ms": t} for v, t in ms.items()]
        print(f"   pipeline M={m}: {ms}", flush=True)
        del built
        torch.cuda.empty_cache()
    b.data["pipeline"] = {"model": "llama2-7b", "rows": rows, "timing": "CUDA graphs, 9 interleaved trials, median"}


def layers_7b(b: Bench) -> None:
    _layer_bench(b, "llama2-7b", LLAMA2_7B, (1, 16, 2048) if b.quick else MS_ALL)


def layers_34b(b: Bench) -> None:
    _layer_bench(b, "codellama-34b", CODELLAMA_34B, (1, 2048) if b.quick else MS_ALL)


# ------------------------------------------------------------------ 5. end to end, 7B shape

def end_to_end(b: Bench) -> None:
    from e2e_bench import run_e2e

    b.data["e2e"] = run_e2e(config_of(LLAMA2_7B), quick=b.quick)


def tensor_parallel(b: Bench) -> None:
    from e2e_bench import run_tp_smoke

    b.data["tp"] = run_tp_smoke(b.model_dir, b.out)


SECTIONS = [
    ("environment", environment, 1),
    ("ceilings", ceilings, 20),
    ("kernel_checks", kernel_checks, 60),
    ("tiny_model", tiny_model, 60),
    ("layers_7b", layers_7b, 60),
    ("pipeline_7b", pipeline_7b, 20),
    ("end_to_end", end_to_end, 90),
    ("layers_34b", layers_34b, 60),
    ("tensor_parallel", tensor_parallel, 30),
]


def goals(data: dict) -> dict:
    from gpu_bench_report import goal_values

    return goal_values(data)
