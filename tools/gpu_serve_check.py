"""GPU self-check and mini benchmark of the kernel serving backend (``sq-serve --device cuda``).

One invocation, under six minutes on one H200, writes ``gpu-serve-check.json`` and
``gpu-serve-check.md`` under ``--out``::

    PYTHONPATH=. python tools/gpu_serve_check.py --out OUT [--model shared/models/tiny-code-llama ...] [--quick]

Sections (each one records its error and the run goes on):

1. ``environment``: GPU, versions.
2. ``tiny_random``: a small random Llama per variant (fp16, W8A8 static, W8A8 per-token,
   W4A16) on the kernel backend: batched greedy == one-prompt-at-a-time greedy through the
   engine (prompts of different lengths, prefill in chunks), each generated token checked
   against the kernel model's own full forward (teacher forcing; a mismatch must be a near
   tie), decode-step logits of rows at different positions against that full forward, and
   whether the decode steps were replayed from CUDA graphs.
3. ``models``: each ``--model`` directory. An HF directory is quantized here in memory with
   round-to-nearest recipes; for every variant the kernel backend's prefill and decode
   logits (slot cache, graphs) are compared with the float32 fake-quant reference, next to
   the float16 reference's own error, and batched greedy is compared with one at a time.
   A quantized directory is compared the same way with the torch backend's model.
4. ``bench_7b``: a Llama-2-7B-shaped model with a reduced number of layers, random weights
   per variant: offline output tokens/s through the engine at batch 1, 8, 32, 64 for the kernel
   backend and for the torch reference backend (float32 fake-quant; weight values do not
   change speed), peak memory, and how many 2048-token sequences a full 32-layer model of
   each variant leaves room for in the same memory budget.
5. ``online``: the same shape written to disk (quantized by ``sq-export`` with round-to-nearest
   recipes) and served over HTTP by ``sq-serve --device cuda``: after a warm-up round a closed
   loop measures capacity, then Poisson arrivals at fractions of FP16's capacity (the same rates
   for every variant) give throughput, TTFT and inter-token latency percentiles and the rate at
   which the median TTFT breaks down.
6. ``transformers``: the user's alternative on the same shape and GPU: Hugging Face transformers
   ``generate`` with a static cache and ``torch.compile`` (mode ``reduce-overhead``, bfloat16),
   output tokens/s at the ``bench_7b`` batch sizes and lengths, and decode-only tokens/s.
7. ``served``: served (HTTP) over offline throughput of the first ``--model`` at batch 8.

The report sets the sections side by side: served (closed loop) over offline throughput at the
online batch, served speed-ups over served FP16 next to the offline ones, and the kernel
backend's FP16 over transformers at every batch size.

Float16 tolerance: batched and single runs, decode steps and full forwards use different
GEMM shapes (and split-K choices), so their logits differ by float16 rounding, about 1e-3
relative; with static INT8 activations a rounding flip moves a whole INT8 step. Greedy
tokens may then part only where the top two logits are within twice the largest logit
change measured between the serving path and a full forward on the same positions (at
least ``NEAR_TIE``): the check passes when every generated token equals the full forward's
argmax or is such a tie, and each variant's threshold is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PYTHONUNBUFFERED", "1")
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])  # sq-serve child
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sqdeploy.core.report import source_revision  # noqa: E402

DEVICE = "cuda"  # --device cpu: a slow smoke run of this script itself
REFERENCE = True  # --no-reference: bench_7b without the float32 torch backend
NEAR_TIE = 0.05  # logits (float16 model): a top-2 gap below this may flip under rounding
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


class IdTokenizer:
    """What the engine needs of a tokenizer, for models without one (random weights)."""

    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids, **kw) -> str:
        return "".join(f"<{int(i)}>" for i in ids)

    def __call__(self, text, add_special_tokens=True):
        raise NotImplementedError("send token ids")


class Check:
    def __init__(self, out: Path, budget: float, quick: bool):
        self.out, self.deadline, self.quick = out, time.time() + budget, quick
        out.mkdir(parents=True, exist_ok=True)
        self.data: dict = {"sections": {}, "near_tie": NEAR_TIE, "quick": quick}

    def run(self, name: str, fn, *args) -> None:
        if time.time() > self.deadline:
            self.data["sections"][name] = {"status": "skipped: time budget spent"}
            log(f"== {name}: skipped (time budget)")
            return
        log(f"== {name}")
        t = time.time()
        try:
            fn(self, *args)
            self.data["sections"][name] = {"status": "ok", "seconds": round(time.time() - t, 1)}
        except Exception:  # noqa: BLE001 - record and go on to the next section
            tb = traceback.format_exc()
            print(tb, flush=True)
            self.data["sections"][name] = {"status": "failed", "seconds": round(time.time() - t, 1), "error": tb[-3000:]}
        finally:
            torch.cuda.empty_cache()
            self.save()
        log(f"   {name}: {self.data['sections'][name]['status']} ({time.time() - t:.1f}s)")

    def save(self) -> None:
        (self.out / "gpu-serve-check.json").write_text(json.dumps(self.data, indent=1, default=str))


# ------------------------------------------------------------------ building blocks

def kernel_backend(model, tokenizer=None, max_batch: int = 8, max_prefill: int = 4096, max_len: int | None = None,
                   graphs: bool = True, description: str = "random"):
    from sqdeploy.runtime.backends.kernel import KernelBackend, KernelConfig

    cfg = KernelConfig(max_batch_size=max_batch, max_prefill_tokens=max_prefill, max_model_len=max_len, cuda_graphs=graphs,
                       gpu_memory_fraction=0.8)
    return KernelBackend(None, DEVICE, cfg, model=model, tokenizer=tokenizer or IdTokenizer(), description=description,
                         log=lambda m: log(f"   {m}"))


def reference_backend(model, tokenizer=None, description: str = "reference"):
    """The torch backend around an already built reference model (float32 fake-quant)."""
    from sqdeploy.runtime.backends.base import ModelInfo
    from sqdeploy.runtime.backends.torch import TorchBackend

    be = TorchBackend.__new__(TorchBackend)
    be.device = torch.device(DEVICE)
    be.model = model.eval()
    be.tokenizer = tokenizer or IdTokenizer()
    cfg = model.cfg
    be.info = ModelInfo(Path("."), description, cfg.vocab_size, cfg.max_positions, cfg.num_layers, frozenset(), 0, Path("."))
    return be


def prompts_of(n: int, vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(16, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def _reset_peak() -> None:
    if DEVICE != "cpu":
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return None if DEVICE == "cpu" else torch.cuda.max_memory_allocated() / 2**30


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@torch.no_grad()
def teacher_forced(model, prompt: list[int], gen: list[int], tie: float = NEAR_TIE) -> dict:
    """Each generated token against the argmax of one full forward (no cache) over prompt + generation.

    ``tie``: the top-2 gap under which the serving path may pick the other token (see ``tie_threshold``)."""
    ids = torch.tensor([prompt + gen[:-1]], device=DEVICE)
    logits = model(ids)[0, len(prompt) - 1 :].float()
    best = logits.argmax(-1).tolist()
    gaps = []
    for i, (g, b) in enumerate(zip(gen, best)):
        if g != b:
            gaps.append(float(logits[i, b] - logits[i, g]))
    return {"agree": sum(g == b for g, b in zip(gen, best)) / len(gen), "mismatch_gaps": gaps,
            "ok": all(x <= tie for x in gaps)}


def lead(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tie_threshold(got: list[torch.Tensor], full: list[torch.Tensor]) -> float:
    """The top-2 gap below which a greedy token may legitimately differ between the serving path and a
    full forward of the same model: the serving path's decode steps and the full forward run different
    GEMM shapes, so their float16 logits differ (for static INT8 activations a rounding flip moves a
    whole INT8 step). A token flips only where the gap is below the sum of the two logits' changes,
    at most twice the largest change measured between the two paths on the same positions."""
    d = max(float((g - f).abs().max()) for g, f in zip(got, full))
    return max(NEAR_TIE, 2 * d)


def greedy_agreement(backend, prompts: list[list[int]], n_new: int, max_batch: int, max_prefill: int,
                     tie: float = NEAR_TIE) -> dict:
    from sqdeploy.runtime import BatchConfig, SamplingParams, generate
    from sqdeploy.runtime.batching import BatchingEngine

    engine = BatchingEngine(backend, BatchConfig(max_batch, max_prefill))
    try:
        p = SamplingParams(max_new_tokens=n_new, ignore_eos=True)
        replays0 = backend.decoder.replays
        batched = [c.token_ids for c in generate(engine, prompts, p)]
        single = [generate(engine, [q], p)[0].token_ids for q in prompts]
        steps = dict(engine.scheduler.steps)
    finally:
        engine.shutdown()
    tf = [teacher_forced(backend.model, q, b, tie) for q, b in zip(prompts, batched)]
    tf1 = [teacher_forced(backend.model, q, s, tie) for q, s in zip(prompts, single)]
    rows_equal = sum(a == b for a, b in zip(batched, single))
    return {
        "prompts": len(prompts), "new_tokens": n_new, "rows_identical": rows_equal, "tie_threshold": tie,
        "leading_match": [lead(a, b) for a, b in zip(batched, single)],
        "teacher_forced_agree_batched": [t["agree"] for t in tf],
        "teacher_forced_agree_single": [t["agree"] for t in tf1],
        "mismatch_gaps": [g for t in tf + tf1 for g in t["mismatch_gaps"]],
        "ok": all(t["ok"] for t in tf + tf1),
        "graph_replays": backend.decoder.replays - replays0,
        "graphs_captured": sorted(backend.decoder.graphs), "graph_capture_failed": sorted(backend.decoder.failed),
        "scheduler_steps": steps,
    }


@torch.no_grad()
def slot_logits(backend, prompts: list[list[int]], conts: list[list[int]]) -> list[torch.Tensor]:
    """Logits the serving path computes: each prompt prefilled into its own slot, then the continuations
    decoded together, one step per token (rows at different positions, replayed graphs)."""
    slots = [backend.acquire() for _ in prompts]
    try:
        out = [[backend.prefill(s, p, 0).float()] for s, p in zip(slots, prompts)]
        idx = torch.tensor(slots, device=DEVICE)
        for step in range(len(conts[0])):
            backend.set_next(idx, torch.tensor([c[step] for c in conts], device=DEVICE))
            logits = backend.decode(slots)
            for i in range(len(slots)):
                out[i].append(logits[i].float())
        return [torch.stack(o) for o in out]
    finally:
        for s in slots:
            backend.release(s)


@torch.no_grad()
def full_logits(model, prompt: list[int], cont: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + cont], device=DEVICE)
    return model(ids)[0, len(prompt) - 1 :].float()


# ------------------------------------------------------------------ sections

def environment(c: Check) -> None:
    import transformers
    import triton

    if DEVICE == "cpu":
        c.data["environment"] = {"gpu": "none (cpu smoke run)", "torch": torch.__version__}
        return
    p = torch.cuda.get_device_properties(0)
    c.data["environment"] = {
        "gpu": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}",
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
        "transformers": transformers.__version__,
    }
    c.data["environment"]["commit"] = source_revision(Path(__file__).resolve().parents[1])
    log(f"   {c.data['environment']}")


TINY = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=1024, intermediate_size=2816,
    num_hidden_layers=3, num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=8192,
    max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="float16",
)


def tiny_random(c: Check) -> None:
    from sqdeploy.testing.random_weights import VARIANTS, config_of, random_model

    cfg = config_of(TINY if DEVICE != "cpu" else dict(TINY, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2))
    rows = []
    variants = ["fp16", "w8a8", "w4a16"] if c.quick else ["fp16", "w8a8", "w8a8-token", "w4a16"]
    for v in variants:
        row: dict = {"variant": v}
        try:
            model = random_model(cfg, VARIANTS[v], DEVICE, seed=1)
            be = kernel_backend(model, max_batch=8, max_prefill=64, max_len=512, description=f"tiny {v}")
            prompts = prompts_of(8, cfg.vocab_size, [5, 17, 64, 100, 3, 130, 40, 9])
            conts = prompts_of(len(prompts[:6]), cfg.vocab_size, [12], seed=3)
            got = slot_logits(be, prompts[:6], conts)
            full = [full_logits(model, p, k) for p, k in zip(prompts[:6], conts)]
            errs = [rel(g, f) for g, f in zip(got, full)]
            row["decode_logits_rel_err_vs_full_forward"] = max(errs)
            row["greedy"] = greedy_agreement(be, prompts, 16 if c.quick else 32, 8, 64, tie_threshold(got, full))
            # a decode step computes what a full forward computes, up to float16 rounding: 1e-2 relative
            # for float16 and weight-only INT4; static INT8 activations turn rounding flips into whole
            # INT8 steps, so there only batched == single and the teacher-forced ties are checked.
            bound = 1e-2 if v in ("fp16", "w4a16") else float("inf")
            row["ok"] = bool(row["greedy"]["ok"] and max(errs) < bound and row["greedy"]["graph_replays"] > 0
                             and row["greedy"]["rows_identical"] == len(prompts))
            log(f"   {v}: rows identical {row['greedy']['rows_identical']}/8, teacher-forced ok {row['greedy']['ok']}, "
                f"logit err {max(errs):.2e}, graphs {row['greedy']['graphs_captured']} replays {row['greedy']['graph_replays']}")
            del be, model
        except Exception:  # noqa: BLE001
            row["error"] = traceback.format_exc()[-2000:]
            log(f"   {v}: FAILED {row['error'].splitlines()[-1]}")
        rows.append(row)
        torch.cuda.empty_cache()
    c.data["tiny_random"] = {"config": TINY, "rows": rows}


def _rtn(name: str, weight: dict, act: str = "none"):
    from sqdeploy.quantize.recipes import parse_recipe

    return parse_recipe({"name": name, "scheme": {"weight": weight, "act": {"kind": act}}, "algorithm": "rtn"})


def shared_recipes(quick: bool) -> dict:
    out = {
        "fp16": "fp16",
        "w8a8 static (rtn)": _rtn("w8a8-static-rtn", {"bits": 8, "granularity": "channel"}, "static_tensor"),
        "w8a8 per-token (rtn)": _rtn("w8a8-token-rtn", {"bits": 8, "granularity": "channel"}, "dynamic_token"),
        "w4a16 (rtn g128)": "w4a16-rtn",
    }
    if quick:
        out.pop("w8a8 per-token (rtn)")
    return out


def _calib_file() -> str:
    path = Path("/tmp/sqdeploy-serve-calib.jsonl")
    src = (Path(__file__).resolve().parents[1] / "sqdeploy" / "quantize" / "smoothing.py").read_text()
    path.write_text("\n".join(json.dumps({"text": src[i : i + 2000]}) for i in range(0, len(src), 2000)) + "\n")
    return str(path)


def _compare(c: Check, label: str, kern_model, ref32, ref16, tokenizer, vocab: int) -> dict:
    prompts = prompts_of(6, min(vocab, 8000), [7, 33, 120, 64, 15, 90], seed=5)
    conts = prompts_of(6, min(vocab, 8000), [10], seed=6)
    be = kernel_backend(kern_model, tokenizer, max_batch=8, max_prefill=48, max_len=512, description=label)
    got = slot_logits(be, prompts, conts)
    row: dict = {"variant": label}
    e_k = [rel(g, full_logits(ref32, p, k)) for g, p, k in zip(got, prompts, conts)]
    row["rel_err_kernel_serving_vs_ref32"] = max(e_k)
    if ref16 is not None:
        e16 = [rel(full_logits(ref16, p, k), full_logits(ref32, p, k)) for p, k in zip(prompts, conts)]
        row["rel_err_fp16_ref_vs_ref32"] = max(e16)
        row["logits_ok"] = bool(max(e_k) <= max(2 * max(e16), 2e-3))
    top1 = [float((g.argmax(-1) == full_logits(ref32, p, k).argmax(-1)).float().mean())
            for g, p, k in zip(got, prompts, conts)]
    row["top1_agree_vs_ref32"] = sum(top1) / len(top1)
    tie = tie_threshold(got, [full_logits(kern_model, p, k) for p, k in zip(prompts, conts)])
    row["greedy"] = greedy_agreement(be, prompts, 16 if c.quick else 32, 8, 48, tie)
    log(f"   {label}: serving logits err {max(e_k):.2e} (fp16 ref {row.get('rel_err_fp16_ref_vs_ref32', float('nan')):.2e}), "
        f"top1 {row['top1_agree_vs_ref32']:.3f}, batched==single rows {row['greedy']['rows_identical']}/6, "
        f"teacher-forced ok {row['greedy']['ok']}, graph replays {row['greedy']['graph_replays']}")
    del be
    return row


def models(c: Check, paths: list[str]) -> None:
    from sqdeploy.kernels import load_for_device
    from sqdeploy.model.checkpoint import HFCheckpoint
    from sqdeploy.model.loading import load_model
    from sqdeploy.model.tokenizer import load_tokenizer
    from sqdeploy.quantize.qmodel import QuantizedModel, is_quantized_dir
    from sqdeploy.testing.inmemory import quantize_in_memory

    results = []
    for path in paths:
        entry: dict = {"path": path, "rows": []}
        results.append(entry)
        try:
            tok = load_tokenizer(Path(path))
        except Exception:  # noqa: BLE001
            tok = None
        try:
            if is_quantized_dir(path):
                sources = {Path(path).name: QuantizedModel(path)}
            else:
                calib = _calib_file()
                sources = {}
                for label, recipe in shared_recipes(c.quick).items():
                    if time.time() > c.deadline - 120:
                        break
                    t = time.time()
                    sources[label] = (HFCheckpoint(path) if recipe == "fp16"
                                      else quantize_in_memory(path, recipe, calib, samples=8, seq_len=128, device=DEVICE))
                    log(f"   {Path(path).name} {label}: source ready in {time.time() - t:.1f}s")
            for label, src in sources.items():
                if time.time() > c.deadline - 90:  # leave time for the benchmark
                    entry["rows"].append({"variant": label, "error": "skipped: time budget"})
                    continue
                try:
                    ref32 = load_model(src, torch.float32, DEVICE)
                    ref16 = load_model(src, torch.float16, DEVICE)
                    kern = load_for_device(src, DEVICE)
                    entry["rows"].append(_compare(c, label, kern, ref32, ref16, tok, src.config.vocab_size))
                    del ref32, ref16, kern
                except Exception:  # noqa: BLE001
                    entry["rows"].append({"variant": label, "error": traceback.format_exc()[-2000:]})
                    log(f"   {label}: FAILED {traceback.format_exc().splitlines()[-1]}")
                torch.cuda.empty_cache()
                c.save()
        except Exception:  # noqa: BLE001
            entry["error"] = traceback.format_exc()[-2000:]
            log(f"   {path}: FAILED {entry['error'].splitlines()[-1]}")
        c.data["models"] = results


def served(c: Check, path: str) -> None:
    """Served (HTTP, a sq-serve process on the same GPU) against offline throughput of one directory."""
    from sqdeploy.runtime.bench.overhead import OverheadConfig, measure_overhead

    cfg = OverheadConfig(batch=8, input_len=128, output_len=32 if c.quick else 64, rounds=2 if c.quick else 3,
                         requests_per_round=8 if c.quick else 16, device=DEVICE, gpu_memory_fraction=0.5)
    r = measure_overhead(path, "kernel", cfg, progress=False)
    c.data["served"] = r
    log(f"   {path}: offline {r['offline_median']:.0f} tok/s, served {r['served_median']:.0f} tok/s "
        f"(ratio {r['served_median'] / r['offline_median']:.2f})")


LAYERS_7B = 4
PREFILL_7B = 8192  # prompt tokens per prefill step, offline and served alike


def _llama7b(layers: int) -> dict:
    from sqdeploy.testing.random_weights import LLAMA2_7B

    if DEVICE == "cpu":  # the smoke run of this script: small shapes
        return dict(TINY, num_hidden_layers=layers, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                    num_key_value_heads=4)
    return dict(LLAMA2_7B, num_hidden_layers=layers)


def _offline(engine, batch: int, in_len: int, out_len: int, repeat: int) -> dict:
    from sqdeploy.runtime.bench.offline import _measure, prompts_for
    from sqdeploy.runtime.bench.online import activity_share

    prompts = prompts_for(batch, in_len, engine.info.vocab_size, 0)
    _measure(engine, prompts, min(out_len, 4))  # warm-up: kernel tuning, graph capture
    before = engine.activity()
    runs = [_measure(engine, prompts, out_len) for _ in range(repeat)]
    after = engine.activity()
    runs.sort(key=lambda r: r["tokens_per_s"])
    return dict(runs[len(runs) // 2], engine=activity_share(before, after))


def _sequences_that_fit(weights: dict, layers_built: int, budget_gib: float) -> dict:
    """2048-token sequences a full 32-layer model of this variant leaves room for in ``budget_gib``."""
    full = weights["linears"] * 32 / layers_built + (weights["total"] - weights["linears"])
    kv_per_seq = 2 * 32 * 32 * 128 * 2 * 2048  # K and V, 32 layers, 32 KV heads of 128, float16
    reserve = 2 << 30  # activations, graphs, logits
    free = budget_gib * 2**30 - full - reserve
    return {"weights_gib_32_layers": round(full / 2**30, 2), "sequences_2048": max(0, int(free // kv_per_seq))}


def bench_7b(c: Check, tokenizer_dir: str | None) -> None:
    from sqdeploy.runtime import BatchConfig
    from sqdeploy.runtime.batching import BatchingEngine
    from sqdeploy.testing.random_weights import VARIANTS, config_of, random_model, weight_bytes

    layers = 2 if c.quick else LAYERS_7B
    hf = _llama7b(layers)
    cfg = config_of(hf)
    in_len, out_len = (128, 32) if c.quick else (512, 128)
    if DEVICE == "cpu":
        in_len, out_len = 16, 4
    batches = (1, 8, 32) if c.quick else (1, 8, 32, 64)
    repeat = 1 if c.quick else 2
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if DEVICE != "cpu" else 141.0
    res: dict = {"layers": layers, "input_len": in_len, "output_len": out_len, "batches": list(batches), "rows": [],
                 "fit": {}}
    c.data["bench_7b"] = res
    variants = ["fp16", "w8a8", "w4a16"] if c.quick else ["fp16", "w8a8", "w8a8-token", "w4a16"]
    for v in variants:
        if time.time() > c.deadline - 45:
            res["rows"].append({"backend": "kernel", "variant": v, "error": "skipped: time budget"})
            continue
        try:
            _reset_peak()
            model = random_model(cfg, VARIANTS[v], DEVICE, layers=layers, seed=0)
            wb = weight_bytes(model)
            res["fit"][v] = {f"{b:g} GiB": _sequences_that_fit(wb, layers, b) for b in (0.9 * total_gib, 24.0)}
            be = kernel_backend(model, max_batch=max(batches), max_prefill=PREFILL_7B, max_len=in_len + out_len,
                                description=f"7B-shaped {v}")
            engine = BatchingEngine(be, BatchConfig(max(batches), PREFILL_7B))
            try:
                for b in batches:
                    r = _offline(engine, b, in_len, out_len, repeat)
                    res["rows"].append({"backend": "kernel", "variant": v, "batch": b, **r})
                    log(f"   kernel {v} batch {b}: {r['tokens_per_s']:.0f} tok/s (ttft {r['ttft_s'] * 1e3:.0f} ms)")
                    c.save()
            finally:
                engine.shutdown()
            res["rows"].append({"backend": "kernel", "variant": v, "peak_gpu_gib": _peak_gib(),
                                "graphs": sorted(be.decoder.graphs), "graph_replays": be.decoder.replays,
                                "graph_capture_failed": sorted(be.decoder.failed)})
            del engine, be, model
        except Exception:  # noqa: BLE001
            res["rows"].append({"backend": "kernel", "variant": v, "error": traceback.format_exc()[-2000:]})
            log(f"   kernel {v}: FAILED {traceback.format_exc().splitlines()[-1]}")
        torch.cuda.empty_cache()
        c.save()
    if not REFERENCE:
        res["reference_note"] = "torch reference backend not run (--no-reference)"
        return
    if time.time() > c.deadline - 60:
        res["reference"] = "skipped: time budget"
        return
    _reference_7b(c, res, hf, tokenizer_dir, in_len, out_len, batches)


def write_random_dir(hf: dict, dest: Path, tokenizer_dir: str | None) -> Path:
    """An HF directory of random float16 weights with the config ``hf`` (and a tokenizer, when given)."""
    from sqdeploy.testing.random_model import make_random_model

    t = time.time()
    spec = {k: v for k, v in hf.items() if k not in ("vocab_size", "dtype")}
    path = make_random_model(spec, dest, vocab_size=hf["vocab_size"], dtype=torch.float16, tokenizer_from=tokenizer_dir)
    log(f"   random {hf['num_hidden_layers']}-layer HF directory written in {time.time() - t:.1f}s")
    return path


def _reference_7b(c: Check, res: dict, hf: dict, tokenizer_dir: str | None, in_len: int, out_len: int, batches) -> None:
    """The torch backend (float32 fake-quant reference) on the same shapes, from a random HF directory."""
    import tempfile

    from sqdeploy.model.checkpoint import HFCheckpoint
    from sqdeploy.model.loading import load_model
    from sqdeploy.runtime import BatchConfig
    from sqdeploy.runtime.batching import BatchingEngine

    with tempfile.TemporaryDirectory(prefix="sq-serve-check-") as tmp:
        path = write_random_dir(hf, Path(tmp) / "llama7b", tokenizer_dir)
        sources = {"fp16": lambda: HFCheckpoint(path)}
        if tokenizer_dir is not None and not c.quick:
            from sqdeploy.testing.inmemory import quantize_in_memory

            calib = _calib_file()
            sources["w8a8"] = lambda: quantize_in_memory(
                path, _rtn("w8a8-static-rtn", {"bits": 8, "granularity": "channel"}, "static_tensor"), calib, 4, 128, DEVICE)
            sources["w4a16"] = lambda: quantize_in_memory(path, "w4a16-rtn", calib, 4, 128, DEVICE)
        else:
            res["reference_note"] = ("W8A8 / W4A16 references need a tokenizer for calibration (--model an HF directory "
                                     "with one) and a full run; the float32 reference's speed barely depends on the recipe")
        for v, make in sources.items():
            if time.time() > c.deadline - 30:
                res["rows"].append({"backend": "torch", "variant": v, "error": "skipped: time budget"})
                continue
            try:
                _reset_peak()
                model = load_model(make(), torch.float32, DEVICE)
                be = reference_backend(model, description=f"7B-shaped {v} reference")
                engine = BatchingEngine(be, BatchConfig(max(batches), max(4096, max(batches) * in_len)))
                try:
                    for b in batches:
                        r = _offline(engine, b, in_len, out_len, 1)
                        res["rows"].append({"backend": "torch", "variant": v, "batch": b, **r})
                        log(f"   torch {v} batch {b}: {r['tokens_per_s']:.0f} tok/s")
                        c.save()
                finally:
                    engine.shutdown()
                res["rows"].append({"backend": "torch", "variant": v, "peak_gpu_gib": _peak_gib()})
                del engine, be, model
            except Exception:  # noqa: BLE001
                res["rows"].append({"backend": "torch", "variant": v, "error": traceback.format_exc()[-2000:]})
                log(f"   torch {v}: FAILED {traceback.format_exc().splitlines()[-1]}")
            torch.cuda.empty_cache()


def transformers_compile(c: Check) -> None:
    """Hugging Face transformers ``generate`` with a static KV cache and ``torch.compile`` (its own
    compiled decode step, CUDA graphs) on the ``bench_7b`` shape (bfloat16, random weights, greedy, no EOS): the path a user takes without
    sq-deploy. Output tokens/s counts prefill as ``bench_7b`` does; decode-only tokens/s divides the
    tokens after the first by the time after a one-token ``generate`` of the same batch."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    layers = 2 if c.quick else LAYERS_7B
    hf = _llama7b(layers)
    in_len, out_len = (128, 32) if c.quick else (512, 128)
    if DEVICE == "cpu":
        in_len, out_len = 16, 4
    batches = (1, 8, 32)  # the sizes users quote for this path; each one compiles and captures anew
    compiled = DEVICE != "cpu"  # CUDA graphs need a GPU; the CPU smoke run checks the plumbing
    res: dict = {"transformers": transformers.__version__, "layers": layers, "input_len": in_len, "output_len": out_len,
                 "dtype": "bfloat16", "cache": "static", "compile": "generate's compiled decode step: reduce-overhead, fullgraph" if compiled else "none",
                 "rows": []}
    c.data["transformers"] = res
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    cfg = LlamaConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type", "dtype")})
    with torch.device(DEVICE):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    gen = model.generation_config
    gen.cache_implementation, gen.eos_token_id, gen.pad_token_id, gen.do_sample = "static", None, 0, False
    # generate compiles its own decode step when the cache is static and the model on a GPU (wrapping
    # ``model.forward`` in torch.compile by hand instead breaks on CUDA-graph outputs the cache reuses)
    gen.compile_config = transformers.CompileConfig(fullgraph=True, mode="reduce-overhead") if compiled else None

    def timed(ids, n: int) -> float:
        torch.cuda.synchronize() if DEVICE != "cpu" else None
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n)
        torch.cuda.synchronize() if DEVICE != "cpu" else None
        if out.shape[1] != ids.shape[1] + n:
            raise RuntimeError(f"generate stopped at {out.shape[1] - ids.shape[1]} of {n} tokens")
        return time.perf_counter() - t

    for b in batches:
        if time.time() > c.deadline - 30:
            res["rows"].append({"batch": b, "error": "skipped: time budget"})
            continue
        try:
            gen_ids = torch.Generator(device="cpu").manual_seed(b)
            ids = torch.randint(3, cfg.vocab_size, (b, in_len), generator=gen_ids).to(DEVICE)
            t = time.time()
            timed(ids, out_len), timed(ids, 1)  # compile and capture for this batch size
            warm = time.time() - t
            full = sorted(timed(ids, out_len) for _ in range(2))[0]
            first = sorted(timed(ids, 1) for _ in range(2))[0]
            row = {"batch": b, "tokens_per_s": b * out_len / full, "e2e_s": full, "ttft_s": first,
                   "decode_tokens_per_s": b * (out_len - 1) / max(full - first, 1e-9), "warmup_s": round(warm, 1)}
            res["rows"].append(row)
            log(f"   transformers batch {b}: {row['tokens_per_s']:.0f} tok/s, decode {row['decode_tokens_per_s']:.0f} tok/s "
                f"(compile + capture {warm:.0f}s)")
        except Exception:  # noqa: BLE001
            res["rows"].append({"batch": b, "error": traceback.format_exc()[-2000:]})
            log(f"   transformers batch {b}: FAILED {traceback.format_exc().splitlines()[-1]}")
        c.save()
    del model
    torch._dynamo.reset()


ONLINE_RECIPES = {  # variant -> sq-export recipe (round-to-nearest: speed does not depend on the values)
    "fp16": None,
    "w8a8": "w8a8-sq:alpha=null:rounding=rtn:gptq_act_order=false",
    "w4a16": "w4a16-rtn",
}


def online(c: Check, tokenizer_dir: str | None) -> None:
    """HTTP serving under Poisson arrivals (as in the SmoothQuant+ paper), per variant of a 7B-shaped Llama
    with ``LAYERS_7B`` layers written to disk (random weights; quantized by ``sq-export`` with
    round-to-nearest recipes). A warm-up round, then a closed loop of ``batch`` concurrent requests
    measures the server's capacity; then Poisson rates at fractions of FP16's capacity, the same
    rates for every variant (so TTFTs compare at equal load), give throughput, time to first token
    and inter-token latency percentiles, and the rate at which the median TTFT breaks down (4x the
    lightest rate's)."""
    import asyncio
    import subprocess
    import tempfile

    from sqdeploy.runtime.bench.online import LoadPoint, RequestSpec, breakdown_rate, poisson_arrivals, run_point
    from sqdeploy.runtime.bench.overhead import OverheadConfig, _start_server
    from sqdeploy.runtime.server.run import free_port

    layers = 2 if c.quick else LAYERS_7B
    hf = _llama7b(layers)
    in_len, out_len, batch = (128, 32, 16) if c.quick else (512, 128, 32)
    if DEVICE == "cpu":
        hf = dict(hf, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4,
                  head_dim=64, vocab_size=8192)
        in_len, out_len, batch = 16, 4, 4
    fractions = (0.5, 1.0, 1.5, 2.0) if not c.quick else (0.5, 1.0)
    res: dict = {"layers": layers, "input_len": in_len, "output_len": out_len, "batch": batch,
                 "fractions_of_fp16_capacity": list(fractions), "variants": {}}
    c.data["online"] = res
    with tempfile.TemporaryDirectory(prefix="sq-serve-online-") as tmp:
        base = write_random_dir(hf, Path(tmp) / "fp16", tokenizer_dir)
        calib = _calib_file()
        for v, recipe in ONLINE_RECIPES.items():
            if time.time() > c.deadline - 40:
                res["variants"][v] = {"error": "skipped: time budget"}
                continue
            row: dict = {"recipe": recipe}
            res["variants"][v] = row
            try:
                path = str(base)
                if recipe:
                    t = time.time()
                    path = str(Path(tmp) / v)
                    cmd = [sys.executable, "-m", "sqdeploy.cli.export", str(base), "--recipe", recipe, "--calib", calib,
                           "--calib-samples", "4", "--calib-seq-len", "128", "--device", DEVICE, "--out", path]
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30, c.deadline - time.time()))
                    if done.returncode:
                        raise RuntimeError(f"sq-export failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
                    row["export_s"] = round(time.time() - t, 1)
                port = free_port()
                cfg = OverheadConfig(batch=batch, input_len=in_len, output_len=out_len, device=DEVICE,
                                     gpu_memory_fraction=0.8, prefill_tokens=PREFILL_7B)
                server = _start_server(path, "kernel", cfg, port)
                url = f"http://127.0.0.1:{port}"
                try:
                    # eight waves: the first wave's connection set-up and each wave's turnaround (all of a
                    # wave's requests end in one step) weigh an eighth each, as in a longer-running server
                    prompts = prompts_of(8 * batch, 8000 if DEVICE != "cpu" else 2000, [in_len], seed=11)
                    specs = [RequestSpec(q, out_len) for q in prompts]
                    # a first closed-loop round tunes the kernels for the prefill shapes it meets and
                    # fills the allocator: measured separately, so that capacity is the steady state
                    warm = asyncio.run(run_point(url, "bench", specs[: 2 * batch], LoadPoint("concurrency", batch)))
                    row["warmup_closed_loop"] = warm
                    closed = asyncio.run(run_point(url, "bench", specs, LoadPoint("concurrency", batch)))
                    cap = closed["request_throughput"]
                    row["closed_loop"] = closed
                    log(f"   online {v}: capacity {cap:.1f} req/s ({closed['output_throughput']:.0f} tok/s at "
                        f"{batch} concurrent; warm-up round {warm['output_throughput']:.0f} tok/s)")
                    base_cap = res.setdefault("base_capacity_req_s", cap)  # the first variant's (fp16): common rates
                    row["points"] = []
                    for i, f in enumerate(fractions):
                        if time.time() > c.deadline - 15:
                            break
                        rate = f * base_cap
                        n = int(min(max(rate * (4 if c.quick else 5), 16), 6 * batch))
                        arrivals = poisson_arrivals(n, rate, seed=100 + i)
                        specs = [RequestSpec(prompts[k % len(prompts)], out_len, a) for k, a in enumerate(arrivals)]
                        pt = asyncio.run(run_point(url, "bench", specs, LoadPoint("rate", rate)))
                        row["points"].append(pt)
                        log(f"   online {v} {rate:.1f} req/s: {pt['output_throughput']:.0f} tok/s, ttft p50 "
                            f"{1e3 * (pt['ttft_s']['p50'] or 0):.0f} ms p99 {1e3 * (pt['ttft_s']['p99'] or 0):.0f} ms, "
                            f"itl p50 {1e3 * (pt['itl_s']['p50'] or 0):.1f} ms p99 {1e3 * (pt['itl_s']['p99'] or 0):.1f} ms"
                            f"{', ' + str(pt['failed']) + ' failed' if pt['failed'] else ''}"
                            f"{', ' + str(pt.get('rejected', 0)) + ' rejected (429)' if pt.get('rejected') else ''}")
                        c.save()
                    row["breakdown"] = breakdown_rate(row["points"])
                finally:
                    server.terminate()
                    server.wait(timeout=120)
            except Exception:  # noqa: BLE001
                row["error"] = traceback.format_exc()[-2000:]
                log(f"   online {v}: FAILED {row['error'].strip().splitlines()[-1]}")
            c.save()


# ------------------------------------------------------------------ report

def plot_online(data: dict, path: Path) -> Path | None:
    """Throughput and latency percentiles against the offered Poisson rate, one line per variant."""
    on = data.get("online") or {}
    rows = {v: r["points"] for v, r in on.get("variants", {}).items() if r.get("points")}
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), constrained_layout=True)
    for v, pts in rows.items():
        x = [p["value"] for p in pts]
        axes[0].plot(x, [p["output_throughput"] for p in pts], "o-", label=v)
        for key, ax in (("ttft_s", axes[1]), ("itl_s", axes[2])):
            line, = ax.plot(x, [1e3 * (p[key]["p50"] or float("nan")) for p in pts], "o-", label=f"{v} p50")
            ax.plot(x, [1e3 * (p[key]["p99"] or float("nan")) for p in pts], "^:", color=line.get_color(), label=f"{v} p99")
    for ax, title in zip(axes, ("output tokens/s", "time to first token, ms", "inter-token latency, ms")):
        ax.set_xlabel("offered requests/s (Poisson)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    fig.suptitle(f"sq-serve --device cuda, 7B-shaped Llama with {on['layers']} layers, input {on['input_len']}, "
                 f"output {on['output_len']} ({data.get('environment', {}).get('gpu')})")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def error_row(key, error: str, columns: int) -> str:
    """A table row for a failed entry: its key, the error's last line, empty cells to ``columns``."""
    last = (error or "").strip().splitlines()[-1:] or [""]
    return f"| {key} | error: {last[0][:100]} |" + "|" * (columns - 2)


def render(data: dict) -> str:
    env = data.get("environment", {})
    lines = ["# Kernel serving backend: GPU self-check", "",
             f"GPU: {env.get('gpu')} ({env.get('memory_gib')} GiB), torch {env.get('torch')}, CUDA {env.get('cuda')}, "
             f"triton {env.get('triton')}, transformers {env.get('transformers')}, commit {env.get('commit')}"
             f"{' (quick run)' if data.get('quick') else ''}", "",
             "Greedy criterion: every generated token equals the full forward's argmax, or its top-2 gap is at most the "
             f"variant's tie threshold: twice the largest logit change between the serving path and a full forward "
             f"on the same positions, at least {data.get('near_tie')}.", "", "## Sections", "", "| section | status | seconds |",
             "|---|---|---|"]
    for name, s in data["sections"].items():
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', '')} |")
    lines += ["", "Verdict: " + verdict(data)]
    tr = data.get("tiny_random")
    if tr:
        lines += ["", "## Tiny random Llama on the kernel backend", "",
                  "| variant | batched == single rows | teacher-forced ok | tie threshold | min agreement | decode logits rel err "
                  "| graphs | replays | ok |", "|---|---|---|---|---|---|---|---|---|"]
        for r in tr["rows"]:
            g = r.get("greedy")
            if g is None:
                lines.append(error_row(r["variant"], r.get("error", ""), 9))
                continue
            agree = min(g["teacher_forced_agree_batched"] + g["teacher_forced_agree_single"])
            lines.append(f"| {r['variant']} | {g['rows_identical']}/{g['prompts']} | {g['ok']} | {g.get('tie_threshold', '')} | "
                         f"{agree:.3f} | "
                         f"{r.get('decode_logits_rel_err_vs_full_forward', float('nan')):.2e} | {g['graphs_captured']} | "
                         f"{g['graph_replays']} | {r.get('ok')} |")
    for m in data.get("models", []) or []:
        lines += ["", f"## {m['path']}", "",
                  "| variant | serving logits vs fp32 ref | fp16 ref vs fp32 ref | logits ok | top-1 agree | "
                  "batched == single rows | teacher-forced ok | tie threshold | replays |", "|---|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            if "error" in r:
                lines.append(error_row(r["variant"], r["error"], 9))
                continue
            g = r["greedy"]
            lines.append(f"| {r['variant']} | {r['rel_err_kernel_serving_vs_ref32']:.2e} | "
                         f"{r.get('rel_err_fp16_ref_vs_ref32', float('nan')):.2e} | {r.get('logits_ok')} | "
                         f"{r['top1_agree_vs_ref32']:.3f} | {g['rows_identical']}/{g['prompts']} | {g['ok']} | "
                         f"{g.get('tie_threshold', '')} | {g['graph_replays']} |")
        if m.get("error"):
            lines.append(f"\nerror: `{m['error'].splitlines()[-1]}`")
    b = data.get("bench_7b")
    if b:
        lines += ["", f"## 7B-shaped Llama, {b['layers']} layers, offline output tokens/s "
                      f"(input {b['input_len']}, output {b['output_len']})", ""]
        head = "| backend | variant | " + " | ".join(f"batch {x}" for x in b["batches"]) + " | peak GPU GiB |"
        lines += [head, "|" + "---|" * (3 + len(b["batches"]))]
        table: dict = {}
        for r in b["rows"]:
            key = (r["backend"], r["variant"])
            table.setdefault(key, {})
            if "batch" in r:
                table[key][r["batch"]] = f"{r['tokens_per_s']:.0f}"
            elif "peak_gpu_gib" in r:
                table[key]["peak"] = "" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.1f}"
            elif "error" in r:
                table[key]["error"] = r["error"].strip().splitlines()[-1][:80]
        for (be, v), cells in table.items():
            vals = " | ".join(cells.get(x, cells.get("error", "")) for x in b["batches"])
            lines.append(f"| {be} | {v} | {vals} | {cells.get('peak', '')} |")
        if b.get("reference_note"):
            lines += ["", b["reference_note"]]
        if b.get("fit"):
            lines += ["", "2048-token sequences that fit next to a full 32-layer model (float16 KV cache):", "",
                      "| variant | budget | weights GiB | sequences |", "|---|---|---|---|"]
            base = b["fit"].get("fp16", {})
            lines[-2:] = ["| variant | budget | weights GiB | sequences | vs fp16 |", "|---|---|---|---|---|"]
            for v, per in b["fit"].items():
                for budget, f in per.items():
                    ref = base.get(budget, {}).get("sequences_2048")
                    ratio = f"{f['sequences_2048'] / ref:.2f}x" if ref else ""
                    lines.append(f"| {v} | {budget} | {f['weights_gib_32_layers']} | {f['sequences_2048']} | {ratio} |")
    on = data.get("online")
    if on:
        lines += ["", f"## Online: HTTP under Poisson arrivals (7B-shaped Llama, {on['layers']} layers, input "
                      f"{on['input_len']}, output {on['output_len']}, {on['batch']} slots)", "",
                  "| variant | offered req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | failed "
                  "| rejected (429: queue full) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        ms = lambda x: "" if x is None else f"{1e3 * x:.1f}"  # noqa: E731
        notes = []
        for v, row in on["variants"].items():
            if "error" in row:
                lines.append(error_row(v, row["error"], 9))
                continue
            cl = row.get("closed_loop")
            if cl:
                lines.append(f"| {v} | closed loop, {on['batch']} concurrent | {cl['output_throughput']:.0f} | "
                             f"{ms(cl['ttft_s']['p50'])} | {ms(cl['ttft_s']['p99'])} | {ms(cl['itl_s']['p50'])} | "
                             f"{ms(cl['itl_s']['p99'])} | {cl['failed']} | {cl.get('rejected', '')} |")
            for p in row.get("points", []):
                lines.append(f"| {v} | {p['value']:.1f} | {p['output_throughput']:.0f} | {ms(p['ttft_s']['p50'])} | "
                             f"{ms(p['ttft_s']['p99'])} | {ms(p['itl_s']['p50'])} | {ms(p['itl_s']['p99'])} | {p['failed']} "
                             f"| {p.get('rejected', '')} |")
            if row.get("breakdown"):
                notes.append(f"{v}: breakdown rate {row['breakdown']['rate']} ({row['breakdown']['reason']})")
        lines += [""] + [f"- {n}" for n in notes]
    hf = data.get("transformers")
    if hf:
        lines += ["", f"## The user's alternative: transformers {hf['transformers']} generate, static cache, torch.compile "
                      f"({hf['compile']}), {hf['dtype']}", "",
                  "| batch | output tok/s | decode-only tok/s | kernel FP16 offline tok/s | kernel FP16 / transformers |",
                  "|---|---|---|---|---|"]
        ours = {r["batch"]: r["tokens_per_s"] for r in (data.get("bench_7b") or {}).get("rows", [])
                if r.get("backend") == "kernel" and r.get("variant") == "fp16" and "batch" in r}
        for r in hf["rows"]:
            if "error" in r:
                lines.append(error_row(r["batch"], r["error"], 5))
                continue
            k, t = ours.get(r["batch"]), r["tokens_per_s"]
            lines.append(f"| {r['batch']} | {t:.0f} | {r['decode_tokens_per_s']:.0f} | "
                         f"{'' if k is None else f'{k:.0f}'} | {'' if k is None else f'{k / t:.2f}x'} |")
    lines += served_vs_offline(data)
    sv = data.get("served")
    if sv:
        lines += ["", f"## Served vs offline ({sv.get('path')}, kernel backend, batch 8)", "",
                  f"offline {sv['offline_median']:.1f} tok/s, served {sv['served_median']:.1f} tok/s, "
                  f"served / offline {sv['served_median'] / sv['offline_median']:.2f}"]
    return "\n".join(lines) + "\n"


def served_vs_offline(data: dict) -> list[str]:
    """Served (online closed loop) against offline throughput at the online batch, and the served
    speed-ups over FP16 next to the offline ones: the two serving goals, from one run."""
    on, b = data.get("online"), data.get("bench_7b")
    if not on or not b or on.get("input_len") != b.get("input_len") or on.get("output_len") != b.get("output_len"):
        return []
    offline = {r["variant"]: r["tokens_per_s"] for r in b["rows"]
               if r.get("backend") == "kernel" and r.get("batch") == on["batch"] and "tokens_per_s" in r}
    served = {v: row["closed_loop"]["output_throughput"] for v, row in on["variants"].items() if row.get("closed_loop")}
    lines = ["", f"## Served vs offline at batch {on['batch']} (same shape, lengths and GPU)", "",
             "| variant | offline tok/s | served tok/s | served / offline | offline vs fp16 | served vs fp16 |",
             "|---|---|---|---|---|---|"]
    for v in served:
        off, srv = offline.get(v), served[v]
        ratio = lambda x, y: "" if not x or not y else f"{x / y:.2f}"  # noqa: E731
        lines.append(f"| {v} | {'' if off is None else f'{off:.0f}'} | {srv:.0f} | {ratio(srv, off)} | "
                     f"{ratio(off, offline.get('fp16'))} | {ratio(srv, served.get('fp16'))} |")
    lines += _engine_time(on, b)
    ttft = {v: {round(p["value"], 3): p["ttft_s"]["p50"] for p in row.get("points", [])} for v, row in on["variants"].items()}
    base = ttft.get("fp16", {})
    if base and on.get("fractions_of_fp16_capacity"):
        lines += ["", "Median TTFT at the same Poisson rate, against FP16's:", "",
                  "| variant | " + " | ".join(f"{r:.1f} req/s" for r in base) + " |", "|---|" + "---|" * len(base)]
        for v, per in ttft.items():
            cells = [("" if per.get(r) is None or not b else f"{1e3 * per[r]:.0f} ms ({per[r] / b:.2f}x)")
                     for r, b in base.items()]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


def _engine_time(on: dict, b: dict) -> list[str]:
    """Where the engine worker's time went, offline and served (sq-serve's engine counters): idle time
    served is time the GPU waited for requests; a longer step at equal rows is the server's cost."""
    rows = []
    for r in b["rows"]:
        if r.get("batch") == on["batch"] and r.get("engine"):
            rows.append((r["variant"], "offline", r["engine"]))
    rows += [(v, "served", row["closed_loop"]["engine"]) for v, row in on["variants"].items()
             if (row.get("closed_loop") or {}).get("engine")]
    if not rows:
        return []
    pct = lambda e, k: "" if k not in e else f"{100 * e[k]:.0f}%"  # noqa: E731
    num = lambda e, k, f: "" if k not in e else format(e[k], f)  # noqa: E731
    lines = ["", "Engine worker's time (offline: the timed runs; served: the closed loop):", "",
             "| variant | run | in steps | delivering | idle | ms per step | rows per decode step | prefill batches |",
             "|---|---|---|---|---|---|---|---|"]
    for v, run, e in sorted(rows, key=lambda r: (r[0], r[1])):
        lines.append(f"| {v} | {run} | {pct(e, 'step_fraction')} | {pct(e, 'deliver_fraction')} | {pct(e, 'idle_fraction')} "
                     f"| {num(e, 'ms_per_step', '.2f')} | {num(e, 'rows_per_decode_step', '.1f')} "
                     f"| {num(e, 'prefill_batches', '.0f')} |")
    return lines


def verdict(data: dict) -> str:
    """One line: which checks passed, failed or did not run."""
    parts = []
    tr = (data.get("tiny_random") or {}).get("rows", [])
    if tr:
        ok = [r.get("ok") for r in tr]
        parts.append(f"tiny random {sum(bool(x) for x in ok)}/{len(ok)} ok")
    rows = [r for m in data.get("models", []) or [] for r in m.get("rows", [])]
    if rows:
        good = [r for r in rows if r.get("logits_ok") and r.get("greedy", {}).get("ok")]
        parts.append(f"models {len(good)}/{len(rows)} ok (logits within tolerance, greedy agreement)")
        replays = sum(r.get("greedy", {}).get("graph_replays", 0) for r in rows)
        parts.append(f"CUDA-graph replays {replays}")
    failed = [n for n, s in data["sections"].items() if s["status"] == "failed"]
    if failed:
        parts.append("failed sections: " + ", ".join(failed))
    return "; ".join(parts) or "nothing ran"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu-serve-check.json and gpu-serve-check.md")
    ap.add_argument("--model", action="append", default=[],
                    help="an HF or quantized model directory to check (repeatable), e.g. shared/models/tiny-code-llama")
    ap.add_argument("--quick", action="store_true", help="fewer variants, shorter outputs (a smoke run)")
    ap.add_argument("--budget", type=float, default=330.0, help="seconds; sections past it are skipped (default 330)")
    ap.add_argument("--only", default=None, help="comma-separated sections, run in this order: tiny_random, models, bench_7b, online, transformers, served")
    ap.add_argument("--no-reference", action="store_true",
                    help="bench_7b without the torch (float32 fake-quant) backend it replaces")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    global DEVICE, REFERENCE
    DEVICE, REFERENCE = args.device, not args.no_reference
    if DEVICE != "cpu" and not torch.cuda.is_available():
        print("gpu_serve_check: no CUDA GPU visible; run it on a GPU machine", file=sys.stderr)
        return 2
    for m in args.model:
        if not Path(m).is_dir():
            print(f"gpu_serve_check: --model {m} is not a directory", file=sys.stderr)
            return 2
    c = Check(out, args.budget, args.quick)
    only = set(args.only.split(",")) if args.only else None
    tok_dir = next((m for m in args.model if (Path(m) / "tokenizer.json").exists()), None)
    c.run("environment", environment)
    sections = (("tiny_random", tiny_random, ()), ("models", models, (args.model,)),
                ("bench_7b", bench_7b, (tok_dir,)), ("online", online, (tok_dir,)),
                ("transformers", transformers_compile, ()), ("served", served, (args.model[:1] or [""])[0:1]))
    if only:  # in the order given: what matters most first, before the budget runs out
        sections = sorted((s for s in sections if s[0] in only), key=lambda s: args.only.split(",").index(s[0]))
    for name, fn, extra in sections:
        if name in ("models", "served") and not args.model:
            c.data["sections"][name] = {"status": "skipped: no --model given"}
            continue
        c.run(name, fn, *extra)
    c.save()
    (out / "gpu-serve-check.md").write_text(render(c.data))
    try:
        plot_online(c.data, out / "gpu-serve-online.png")
    except Exception:  # noqa: BLE001  (the numbers are written; a plot is a convenience)
        log(f"online plot failed: {traceback.format_exc().splitlines()[-1]}")
    log(f"wrote {out / 'gpu-serve-check.json'} and {out / 'gpu-serve-check.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
